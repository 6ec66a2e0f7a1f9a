"""Readers for the data formats `train` and `eval` accept, all yielding the same `RawSample`.

- upstream MiniMind-V jsonl: {"conversations": [{"role", "content"}...], "image": "a.jpg, b.jpg"}
- LLaVA json (one JSON array) or jsonl: {"image": "x.jpg" | [...], "conversations": [{"from", "value"}...]}
- parquet: column `conversations` (JSON string or list of {role, content}), `image_bytes` (binary or list)
- plain text for the language-model stage: {"text": "..."} lines (jsonl) or a `text` column (parquet)
- preference pairs for DPO (`open_preferences`): `minimind-v synth --kind pairs`'s {"conversations": prompt,
  "chosen": "...", "rejected": "...", "image": ...} (parquet: `image_bytes`), or RLAIF-V's columns `image` (a
  {"bytes", "path"} struct, bytes or a name), `question`, `chosen`, `rejected`

Every reader gives random access (`reader[i]`, for shuffling) over a small index built in one
pass (line byte offsets for jsonl, element offsets for a JSON array, row-group sizes for parquet),
so a 600K-line file is never held as Python objects. A record that cannot be understood raises
`BadSample` naming its source ("file:line"), so the dataset can skip and count it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from minimind_v.errors import UserError

ImageRef = str | os.PathLike | bytes
"""An image as the data names it: a path (relative to the image folder as read, resolved once checked), or
the encoded file's bytes (parquet)."""

ROLE_ALIASES = {"user": "user", "assistant": "assistant", "system": "system",
                "human": "user", "gpt": "assistant"}
"""Roles of the upstream ({role, content}) and LLaVA ({from, value}) spellings, mapped to ChatML roles."""


class BadSample(Exception):
    """One unusable sample: skipped and counted by `reason`, never fatal on its own.

    reason is a short key (bad_json, bad_record, bad_roles, missing_image, bad_image, image_path,
    image_too_large, marker_mismatch, too_long, no_supervised_tokens; for preference pairs also empty_answer,
    identical_answers) used to count; detail says what.
    """

    def __init__(self, reason: str, detail: str, source: str = "") -> None:
        super().__init__(reason, detail, source)  # plain args: pickles across DataLoader workers
        self.reason, self.detail, self.source = reason, detail, source

    def __str__(self) -> str:
        return f"{self.source}: {self.reason}: {self.detail}" if self.source else f"{self.reason}: {self.detail}"


@dataclass
class RawSample:
    """One record as read: roles normalised to system/user/assistant, images not yet opened."""

    conversations: list[dict[str, str]]
    images: list[ImageRef] = field(default_factory=list)
    source: str = ""
    text: str | None = None
    """Set for a plain-text record (language-model stage); conversations is then empty."""


class Reader(Protocol):
    path: Path
    images_dir: Path | None

    def __len__(self) -> int: ...
    def __getitem__(self, index: int) -> RawSample: ...
    def source(self, index: int) -> str: ...


def parse_record(obj: Any, source: str) -> RawSample:
    """A decoded JSON object (or parquet row) -> RawSample; BadSample when a field is missing or malformed."""
    if not isinstance(obj, dict):
        raise BadSample("bad_record", f"expected a JSON object, got {type(obj).__name__}", source)
    images = _parse_images(obj.get("image", obj.get("images", obj.get("image_bytes"))), source)
    if "conversations" in obj:
        return RawSample(_parse_turns(obj["conversations"], source), images, source)
    if isinstance(obj.get("text"), str):
        return RawSample([], images, source, text=obj["text"])
    raise BadSample("bad_record", "no 'conversations' (or 'text') field", source)


def _parse_turns(turns: Any, source: str) -> list[dict[str, str]]:
    if isinstance(turns, str):  # parquet may store the list as a JSON string
        try:
            turns = json.loads(turns)
        except json.JSONDecodeError as err:
            raise BadSample("bad_json", f"'conversations' is not valid JSON ({err.msg})", source) from None
    if not isinstance(turns, list) or not turns:
        raise BadSample("bad_record", "'conversations' must be a non-empty list", source)
    out = []
    for n, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise BadSample("bad_record", f"turn {n} is not an object", source)
        role = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        if role not in ROLE_ALIASES:
            raise BadSample("bad_roles", f"turn {n}: unknown role {role!r}", source)
        if not isinstance(content, str):
            raise BadSample("bad_record", f"turn {n}: content must be a string", source)
        out.append({"role": ROLE_ALIASES[role], "content": content})
    return out


def _parse_images(value: Any, source: str) -> list[ImageRef]:
    if value is None or value == "":
        return []
    if isinstance(value, (bytes, bytearray)):
        return [bytes(value)]
    if isinstance(value, dict) and ("bytes" in value or "path" in value):  # a Hugging Face Image struct
        return _parse_images(value.get("bytes") or value.get("path"), source)
    if isinstance(value, (list, tuple, np.ndarray)) and len(value) and all(isinstance(v, dict) for v in value):
        return [image for v in value for image in _parse_images(v, source)]
    if isinstance(value, str):  # upstream: "a.jpg, b.jpg"
        return [name.strip() for name in value.split(",") if name.strip()]
    if isinstance(value, (list, tuple, np.ndarray)) and all(isinstance(v, (str, bytes)) for v in value):
        return [v if isinstance(v, bytes) else v.strip() for v in value]
    raise BadSample("bad_record", f"'image' must be a string, bytes or a list of them, got {type(value).__name__}",
                    source)


class JsonlReader:
    """One JSON object per line; random access through the byte offsets of the non-empty lines."""

    def __init__(self, path: Path, images_dir: Path | None) -> None:
        self.path, self.images_dir = path, images_dir
        data = np.fromfile(path, dtype=np.uint8)
        ends = np.flatnonzero(data == ord("\n"))
        if len(data) and data[-1] != ord("\n"):
            ends = np.append(ends, len(data))
        starts = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64)
        keep = (ends - starts) > 0
        blank = (ends - starts == 1) & (data[np.minimum(starts, len(data) - 1)] == ord("\r"))
        keep &= ~blank
        self._starts, self._ends = starts[keep], ends[keep].astype(np.int64)
        self._lines = (np.flatnonzero(keep) + 1).astype(np.int64)  # 1-based, as editors count
        self._fd: int | None = None
        self._pid = -1

    def __len__(self) -> int:
        return len(self._starts)

    def source(self, index: int) -> str:
        return f"{self.path}:{self._lines[index]}"

    def _read(self, index: int) -> bytes:
        if self._pid != os.getpid():  # each DataLoader worker opens its own descriptor
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        start, end = int(self._starts[index]), int(self._ends[index])
        return os.pread(self._fd, end - start, start)

    def record(self, index: int) -> Any:
        """The decoded JSON of line `index`, not yet understood."""
        try:
            return json.loads(self._read(index))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise BadSample("bad_json", f"malformed JSON line ({err})", self.source(index)) from None

    def __getitem__(self, index: int) -> RawSample:
        return parse_record(self.record(index), self.source(index))

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fd": None, "_pid": -1}


class JsonArrayReader:
    """A JSON array (LLaVA style): the text is kept and each element decoded on access."""

    def __init__(self, path: Path, images_dir: Path | None) -> None:
        self.path, self.images_dir = path, images_dir
        self._text = path.read_text(encoding="utf-8")
        self._spans, self._lines = _array_spans(self._text, path)

    def __len__(self) -> int:
        return len(self._spans)

    def source(self, index: int) -> str:
        return f"{self.path}:{self._lines[index]}"

    def record(self, index: int) -> Any:
        start, end = self._spans[index]
        return json.loads(self._text[start:end])

    def __getitem__(self, index: int) -> RawSample:
        return parse_record(self.record(index), self.source(index))


def _array_spans(text: str, path: Path) -> tuple[list[tuple[int, int]], list[int]]:
    """(start, end) of each top-level element and its 1-based line; one malformed element spoils the file."""
    decoder, ws = json.JSONDecoder(), " \t\r\n"
    pos = len(text) - len(text.lstrip(ws))
    if not text.startswith("[", pos):
        raise UserError(f"{path}: expected a JSON array or one JSON object per line")
    pos += 1
    spans, lines, line, counted = [], [], 1, 0
    while True:
        while pos < len(text) and text[pos] in ws + ",":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return spans, lines
        line += text.count("\n", counted, pos)
        counted = pos
        try:
            _, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}:{err.lineno}: malformed JSON ({err.msg})") from None
        spans.append((pos, end))
        lines.append(line)
        pos = end


class ParquetReader:
    """Rows of a parquet file; random access reads (and keeps) the row group a row lies in."""

    def __init__(self, path: Path, images_dir: Path | None, pairs: bool = False) -> None:
        import pyarrow.parquet as pq

        self.path, self.images_dir = path, images_dir
        try:
            parquet = pq.ParquetFile(path)
        except Exception as err:  # pyarrow raises ArrowInvalid / OSError for a file that is not parquet
            raise UserError(f"{path}: not a readable parquet file ({err})") from None
        meta, names = parquet.metadata, set(parquet.schema_arrow.names)  # top-level columns, not nested leaves
        if pairs:
            usable, needs = {"chosen", "rejected"} <= names and names & {"conversations", "question"}, \
                "'chosen', 'rejected' and 'conversations' (or 'question') columns"
        else:
            usable, needs = names & {"conversations", "text"}, "'conversations' (or 'text') column"
        if not usable:
            raise UserError(f"{path}: no {needs}; columns: {', '.join(sorted(names))}")
        pair_columns = ("question", "chosen", "rejected", "images") if pairs else ()
        self._columns = [c for c in ("conversations", "text", "image_bytes", "image", *pair_columns) if c in names]
        sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
        self._group_starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self._file: Any = None
        self._pid = -1
        self._cache: dict[int, list[dict[str, Any]]] = {}

    def __len__(self) -> int:
        return int(self._group_starts[-1])

    def source(self, index: int) -> str:
        return f"{self.path}:row {index}"

    def _group(self, group: int) -> list[dict[str, Any]]:
        import pyarrow.parquet as pq

        if self._pid != os.getpid():
            self._file, self._pid, self._cache = pq.ParquetFile(self.path), os.getpid(), {}
        if group not in self._cache:
            if len(self._cache) >= 2:  # shuffled access mostly stays within the last groups read
                self._cache.pop(next(iter(self._cache)))
            self._cache[group] = self._file.read_row_group(group, columns=self._columns).to_pylist()
        return self._cache[group]

    def record(self, index: int) -> dict[str, Any]:
        """Row `index` as a dict of its read columns, nulls left out."""
        if not 0 <= index < len(self):
            raise IndexError(index)
        group = int(np.searchsorted(self._group_starts, index, side="right")) - 1
        row = self._group(group)[index - int(self._group_starts[group])]
        return {k: v for k, v in row.items() if v is not None}

    def __getitem__(self, index: int) -> RawSample:
        return parse_record(self.record(index), self.source(index))

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_file": None, "_pid": -1, "_cache": {}}


def open_dataset(path: str | Path, images_dir: str | Path | None = None) -> Reader:
    """Open any supported data file; the format follows from the suffix and, for .json, the first character.

    images_dir defaults to `images/` beside the data file when that folder exists, else the file's folder.
    """
    return _open_records(path, images_dir)


def _open_records(path: str | Path, images_dir: str | Path | None, pairs: bool = False) -> Any:
    """The reader of the file's format; `pairs`: its parquet columns are those of preference pairs."""
    path = data_file(path)
    if images_dir is None:
        images_dir = path.parent / "images" if (path.parent / "images").is_dir() else path.parent
    elif not Path(images_dir).is_dir():
        raise UserError(f"--images {images_dir}: no such folder")
    images = Path(images_dir)
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return ParquetReader(path, images, pairs)
    if suffix == ".json" and _first_char(path) == "[":
        return JsonArrayReader(path, images)
    if suffix in (".jsonl", ".json"):
        return JsonlReader(path, images)
    raise UserError(f"--data {path}: unknown format (expected .jsonl, .json or .parquet)")


DATA_SUFFIXES = (".jsonl", ".json", ".parquet")


def data_file(path: str | Path, flag: str = "--data") -> Path:
    """An existing data file, or one line saying what is there instead (nothing, or a folder and its data files)."""
    path = Path(path)
    if path.is_dir():
        inside = sorted(p.name for p in path.iterdir() if p.suffix.lower() in DATA_SUFFIXES)
        hint = f"; its data files: {', '.join(inside[:6])}" if inside else ""
        raise UserError(f"{flag} {path}: a directory, not a data file (.jsonl, .json or .parquet){hint}")
    if not path.is_file():
        raise UserError(f"{flag} {path}: no such file")
    return path


def _first_char(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    return head[:1].decode("ascii", "replace")


@dataclass
class PreferenceRecord:
    """One preference pair as read: the prompt (every turn before the answer, ending with a user turn), its images,
    and the two answers."""

    prompt: list[dict[str, str]]
    chosen: str
    rejected: str
    images: list[ImageRef] = field(default_factory=list)
    source: str = ""


def parse_preference(obj: Any, source: str) -> PreferenceRecord:
    """A decoded pair (ours, or RLAIF-V's columns) -> PreferenceRecord; BadSample for a malformed or useless one."""
    if not isinstance(obj, dict):
        raise BadSample("bad_record", f"expected a JSON object, got {type(obj).__name__}", source)
    images = _parse_images(obj.get("image", obj.get("images", obj.get("image_bytes"))), source)
    if "conversations" in obj:
        prompt = _parse_turns(obj["conversations"], source)
    elif isinstance(obj.get("question"), str):
        prompt = [{"role": "user", "content": obj["question"]}]
    else:
        raise BadSample("bad_record", "no 'conversations' (or 'question') field", source)
    chosen, rejected = (_answer(obj.get(side), side, source) for side in ("chosen", "rejected"))
    if not chosen.strip() or not rejected.strip():
        raise BadSample("empty_answer", f"the {'chosen' if not chosen.strip() else 'rejected'} answer is empty", source)
    if chosen == rejected:
        raise BadSample("identical_answers", "the chosen and the rejected answer are the same", source)
    return PreferenceRecord(prompt, chosen, rejected, images, source)


def _answer(value: Any, side: str, source: str) -> str:
    """An answer given as text, or as a conversation (or one turn) whose last turn is the assistant's."""
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, (list, tuple, np.ndarray)) and len(value):
        turns = _parse_turns(list(value), source)
        if turns[-1]["role"] == "assistant":
            return turns[-1]["content"]
    if isinstance(value, str):
        return value
    raise BadSample("bad_record", f"'{side}' must be a string or end with an assistant turn", source)


class ReaderView:
    """A reader over another one, record for record: the same file, image folder, length and sources; a subclass
    says what `view[i]` is."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.path, self.images_dir = inner, inner.path, inner.images_dir

    def __len__(self) -> int:
        return len(self.inner)

    def source(self, index: int) -> str:
        return self.inner.source(index)


class PreferenceReader(ReaderView):
    """Preference pairs over any reader of records (jsonl, JSON array, parquet): `reader[i]` is a PreferenceRecord."""

    def __getitem__(self, index: int) -> PreferenceRecord:
        return parse_preference(self.inner.record(index), self.source(index))


def open_preferences(path: str | Path, images_dir: str | Path | None = None) -> PreferenceReader:
    """The preference pairs in a data file (images_dir as for `open_dataset`)."""
    return PreferenceReader(_open_records(path, images_dir, pairs=True))
