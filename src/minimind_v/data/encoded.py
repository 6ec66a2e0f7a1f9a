"""The up-front pass over a data file: every record read, checked and encoded once, in worker processes.

The pass fails fast on a file that is mostly broken, gives the exact count of bad records before training, and the
exact length of every sample, which the length-grouped and packing batch plans need. Its result is a handful of
flat arrays, never a Python object per sample (data/encodings.py keeps them on disk and reads them):

- Per sample: `rows` (the record's row in the file), `tok_len` (text tokens), `full_len` (tokens with every image's
  placeholder run), `n_img`, `n_turn`, `kind` (0 conversation, 1 plain text).
- Flat, sample after sample: `ids` and `sup` (the text tokens and whether each is supervised: labels are the ids
  there and IGNORE_INDEX elsewhere), `img_at` (how many text tokens precede each image's placeholder run),
  `turn_ends` (token index, placeholders counted, where each assistant turn ends), `name_len` + `names` (each image's
  file name as the data wrote it, utf-8; empty for an image given as bytes, read from the record instead).

Stored untruncated, with the turn ends, so any `max_seq_len` is a selection and the pretrain and SFT stages over
one file share one pass. Placeholders are inserted when an item is read: they are four fifths of a pretrain
sample's tokens. Image files are checked (one lstat each); a missing one is a fault of its image, which makes the
sample bad only when max_seq_len keeps that image's turn.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np

from minimind_v.constants import IMAGE_MARKER
from minimind_v.data.formats import BadSample, RawSample, Reader
from minimind_v.data.images import ImageFolder
from minimind_v.data.augment import ChatAugmentation
from minimind_v.data.chatml import distrust_chatml, jinja_agrees, renders_as_chatml
from minimind_v.data.template import ImageTokens, Pieces, conversation_pieces, tokenize_many

VERSION = 1
CHUNK = 2048
"""Records per task of a worker process."""
SPOT_CHECK_EVERY = 997
"""With a template taken for ChatML, every this-many-th record is also rendered through jinja and compared."""
PER_SAMPLE = ("rows", "tok_len", "full_len", "n_img", "n_turn", "kind")
FLAT = ("ids", "sup", "img_at", "turn_ends", "name_len", "names")


@dataclass
class PassJob:
    """What one pass reads and how it encodes; forked worker processes inherit it."""

    reader: Reader
    tokenizer: Any
    image: ImageTokens
    text_only: bool = False
    augment: ChatAugmentation = field(default_factory=ChatAugmentation)
    seed: int = 0
    scan_images: bool = True

    def key(self) -> str:
        """A digest of everything the encodings depend on."""
        digest = hashlib.blake2b(digest_size=12)
        with open(self.reader.path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 23), b""):
                digest.update(block)
        digest.update(_tokenizer_fingerprint(self.tokenizer).encode())
        augment = (self.augment.system_prompt_ratio, self.augment.drop_empty_think_ratio)
        described = {"version": VERSION, "reader": type(self.reader).__name__, "text_only": self.text_only,
                     "image": [self.image.image_token_id, self.image.image_token_len, self.image.images_first],
                     "augment": [*augment, self.seed if any(augment) else None], "scan": self.scan_images,
                     "images_dir": os.path.abspath(self.reader.images_dir or ".")}
        digest.update(json.dumps(described, sort_keys=True).encode())
        return digest.hexdigest()


def _tokenizer_fingerprint(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    extra = json.dumps([getattr(tokenizer, "chat_template", None), tokenizer.eos_token_id], default=str)
    return hashlib.blake2b((vocab + extra).encode(), digest_size=12).hexdigest()


class Chunk:
    """The encodings of some consecutive rows, as lists while they are built, arrays once `finish`ed."""

    def __init__(self) -> None:
        self.cols: dict[str, Any] = {name: [] for name in PER_SAMPLE + FLAT}
        self.bad: list[tuple[int, str, str]] = []
        self.faults: list[tuple[int, str, str]] = []  # (image index within this chunk, reason, detail)
        self.mismatch: int | None = None  # a row where jinja disagreed with the ChatML fast path

    def finish(self, ids: list[list[int]], sup: list[bool], dtype: Any) -> Chunk:
        lengths = [len(x) for x in ids]
        self.cols["ids"] = np.fromiter(chain.from_iterable(ids), dtype=dtype, count=sum(lengths))
        self.cols["sup"] = np.repeat(np.asarray(sup, dtype=np.uint8), lengths)
        names = self.cols["names"]
        encoded = [n.encode() for n in names]
        self.cols["names"] = np.frombuffer(b"".join(encoded), dtype=np.uint8).copy()
        self.cols["name_len"] = [len(n) for n in encoded]
        for name in PER_SAMPLE + ("img_at", "turn_ends", "name_len"):
            self.cols[name] = np.asarray(self.cols[name], dtype=np.int64 if name == "rows" else np.int32)
        self.cols["kind"] = self.cols["kind"].astype(np.uint8)
        return self


def encode_rows(job: PassJob, start: int, stop: int) -> Chunk:
    """Rows [start, stop) read, checked and encoded; their texts tokenised in one batch, each distinct text once."""
    chunk, folder = Chunk(), ImageFolder(job.reader.images_dir or Path("."))
    pieces: list[tuple[Pieces, bool]] = []  # (pieces, is_text) of each good sample, in order
    spot = renders_as_chatml(job.tokenizer)
    for row in range(start, stop):
        try:
            raw = job.reader[row]
            encoded = _pieces(job, raw)
            names = _check_images(job, folder, raw, encoded, chunk)
        except BadSample as err:
            chunk.bad.append((row, err.reason, err.detail))
            continue
        if spot and raw.text is None and row % SPOT_CHECK_EVERY == 0 and not jinja_agrees(job.tokenizer,
                                                                                          raw.conversations):
            chunk.mismatch = row
        pieces.append((encoded, raw.text is not None))
        chunk.cols["rows"].append(row)
        chunk.cols["names"] += names
    texts = list(dict.fromkeys(t for p, _ in pieces for t in p.texts))
    known = dict(zip(texts, tokenize_many(job.tokenizer, texts)))
    ids, sup = _assemble(job, pieces, known, chunk)
    vocab = len(job.tokenizer)
    return chunk.finish(ids, sup, np.uint16 if vocab <= 1 << 16 else np.int32)


def _pieces(job: PassJob, raw: RawSample) -> Pieces:
    if raw.text is not None:
        if IMAGE_MARKER in raw.text:
            raise BadSample("marker_mismatch", f"{IMAGE_MARKER} in a plain-text record")
        if not raw.text:
            raise BadSample("no_supervised_tokens", "empty text")
        return Pieces([(raw.text, True)], [])
    messages, n_images = raw.conversations, len(raw.images)
    if job.text_only:
        messages = [{**m, "content": m["content"].replace(IMAGE_MARKER, "")} for m in messages]
        n_images = 0
    place = raw.source.rpartition(":")[2]  # the augmentation draws are keyed by the record's line
    messages, drop_empty_think = job.augment.draw(messages, job.seed, place)
    return conversation_pieces(job.tokenizer, messages, job.image, n_images, drop_empty_think)


def _check_images(job: PassJob, folder: ImageFolder, raw: RawSample, pieces: Pieces, chunk: Chunk) -> list[str]:
    """The sample's image names (b'' stands for bytes); a missing one is recorded as a fault, not yet a bad sample:
    that depends on whether max_seq_len keeps its turn."""
    n_images = sum(part is None for part, _ in pieces.parts)
    names = []
    for image in raw.images[:n_images]:
        if isinstance(image, bytes):
            names.append("")
            continue
        name = os.fspath(image)
        if job.scan_images:
            try:
                folder.check(name)
            except BadSample as err:
                chunk.faults.append((len(chunk.cols["names"]) + len(names), err.reason, err.detail))
        names.append(name)
    return names


def _assemble(job: PassJob, pieces: list[tuple[Pieces, bool]], known: dict[str, list[int]],
              chunk: Chunk) -> tuple[list[list[int]], list[bool]]:
    cols, image_len = chunk.cols, job.image.image_token_len
    ids: list[list[int]] = []
    sup: list[bool] = []
    for encoded, is_text in pieces:
        tokens, images = 0, []
        for part, supervised in encoded.parts:
            if part is None:
                images.append(tokens)
                continue
            ids.append(known[part])
            sup.append(supervised)
            tokens += len(known[part])
        part_tokens = np.cumsum([0] + [image_len if p is None else len(known[p]) for p, _ in encoded.parts])
        ends = [int(part_tokens[n]) for n in encoded.turn_cuts]
        if is_text:
            ids.append([job.tokenizer.eos_token_id])
            sup.append(True)
            tokens += 1
            ends = [tokens]
        cols["tok_len"].append(tokens)
        cols["full_len"].append(tokens + image_len * len(images))
        cols["n_img"].append(len(images))
        cols["img_at"] += images
        cols["n_turn"].append(len(ends))
        cols["turn_ends"] += ends
        cols["kind"].append(int(is_text))
    return ids, sup


_JOB: PassJob | None = None


def _work(bounds: tuple[int, int]) -> Chunk:
    assert _JOB is not None
    return encode_rows(_JOB, *bounds)


@contextmanager
def _tokenizers_fork_quiet() -> Iterator[None]:
    # The Rust tokenizer warns in a forked child when the parent used its thread pool; the workers are single
    # threaded by design, so say so for the fork (the parent's own setting is restored at once).
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old


def run_pass(job: PassJob, workers: int) -> list[Chunk]:
    """Every row encoded, in worker processes (forked, so they inherit the reader and tokenizer) when the file is
    large enough and the platform forks."""
    global _JOB
    n = len(job.reader)
    bounds = [(a, min(a + CHUNK, n)) for a in range(0, n, CHUNK)]
    if workers <= 1 or len(bounds) < 2 or "fork" not in multiprocessing.get_all_start_methods():
        return [encode_rows(job, a, b) for a, b in bounds]
    _JOB = job
    try:
        with _tokenizers_fork_quiet():
            pool = multiprocessing.get_context("fork").Pool(min(workers, len(bounds)))
        with pool:
            return list(pool.imap(_work, bounds))
    finally:
        _JOB = None


def merge(chunks: list[Chunk]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The chunks' columns end to end, and what bad.json holds (image faults renumbered to flat image indices)."""
    arrays = {name: np.concatenate([c.cols[name] for c in chunks]) for name in PER_SAMPLE + FLAT}
    bad, faults, images_before = [], [], 0
    for c in chunks:
        bad += c.bad
        faults += [(images_before + i, reason, detail) for i, reason, detail in c.faults]
        images_before += len(c.cols["name_len"])
    return arrays, {"bad": bad, "faults": faults}


def encode_file(job: PassJob, workers: int) -> tuple[dict[str, np.ndarray], dict[str, Any], str]:
    """The whole file's arrays and bad.json, and a note for the log ('' when there is nothing to say)."""
    chunks = run_pass(job, workers)
    mismatch = next((c.mismatch for c in chunks if c.mismatch is not None), None)
    note = ""
    if mismatch is not None:  # the probes missed a difference: this template is rendered through jinja from now on
        distrust_chatml(job.tokenizer)
        note = (f"; {job.reader.source(mismatch)} renders differently from ChatML, so every record was encoded "
                "again through the chat template itself")
        chunks = run_pass(job, workers)
    return (*merge(chunks), note)


def default_workers() -> int:
    """The CPUs this process may use, at most 8."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus))

