"""The up-front pass's arrays (data/encoded.py) kept on disk for the next run, and read back as samples.

    ROOT/<key>/meta.json          what the key stands for, counts; written last, so its presence means complete
    ROOT/<key>/bad.json           records the pass rejected (row, reason, detail); image faults (flat image index)
    ROOT/<key>/<name>.npy         the arrays, opened memory-mapped (DataLoader workers share the pages)

The key is a digest of the data file's bytes, the tokenizer, the image placeholder settings, the image folder and
the augmentation draws, so a changed file or tokenizer never reads stale encodings; every DDP rank and every later
run (the SFT stage over the same file too) opens the same directory. A later run re-checks only the images found
missing; an image removed since the pass is found when it is read, and counted then like a corrupt one.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from minimind_v.constants import IGNORE_INDEX
from minimind_v.data.encoded import FLAT, PER_SAMPLE, VERSION, PassJob, default_workers, encode_file
from minimind_v.data.formats import BadSample, ImageRef
from minimind_v.data.images import ImageFolder
from minimind_v.data.template import ImageTokens


def default_root() -> Path:
    """$MINIMIND_V_CACHE/encodings, else ~/.cache/minimind-v/encodings (XDG_CACHE_HOME respected)."""
    base = os.environ.get("MINIMIND_V_CACHE")
    if base is None:
        base = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "minimind-v")
    return Path(base) / "encodings"


def store(root: Path, key: str, arrays: dict[str, np.ndarray], bad: dict[str, Any], meta: dict[str, Any]) -> Path:
    """Write the encodings under root/key (in a temporary folder renamed into place: readers never see half)."""
    final = root / key
    temp = root / f".{key}.{os.getpid()}.tmp"
    temp.mkdir(parents=True, exist_ok=True)
    try:
        for name, array in arrays.items():
            np.save(temp / f"{name}.npy", array)
        (temp / "bad.json").write_text(json.dumps(bad))
        (temp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            os.rename(temp, final)
        except OSError:
            if not (final / "meta.json").exists():  # not another process that got there first
                raise
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return final


def load(folder: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
    """The arrays (memory-mapped) and bad.json of a complete encodings folder, or None."""
    if not (folder / "meta.json").exists():
        return None
    try:
        arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in PER_SAMPLE + FLAT}
        return arrays, json.loads((folder / "bad.json").read_text())
    except (OSError, ValueError):  # damaged (a disk that filled up): encoded again
        return None


def image_names(arrays: dict[str, np.ndarray], name_off: np.ndarray, first: int, count: int) -> list[ImageRef]:
    """The stored names of images first .. first+count (b'' for an image given as bytes)."""
    blob = arrays["names"]
    return [bytes(blob[name_off[i]:name_off[i + 1]]).decode() or b"" for i in range(first, first + count)]


def _offsets(counts: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])


class Encodings:
    """A pass's arrays with their offsets: what each sample's tokens, images and turn ends are."""

    def __init__(self, arrays: dict[str, np.ndarray], bad: dict[str, Any], image: ImageTokens, images_dir: Path,
                 stored_at: Path | None = None) -> None:
        self.arrays, self.image, self.images_dir, self.stored_at = arrays, image, images_dir, stored_at
        self.bad_rows = [tuple(b) for b in bad["bad"]]
        self.faults = [tuple(f) for f in bad["faults"]]
        self._offsets()

    def _offsets(self) -> None:
        a = self.arrays
        self.tok_off, self.img_off = _offsets(a["tok_len"]), _offsets(a["n_img"])
        self.turn_off, self.name_off = _offsets(a["n_turn"]), _offsets(a["name_len"])

    def __getstate__(self) -> dict[str, Any]:
        # A spawned DataLoader worker maps the files itself rather than receive a copy of every array.
        if self.stored_at is None:
            return self.__dict__
        return {**self.__dict__, "arrays": None, "tok_off": None, "img_off": None, "turn_off": None, "name_off": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if self.arrays is None:
            loaded = load(self.stored_at)
            if loaded is None:
                raise FileNotFoundError(f"{self.stored_at}: the encodings went missing while the run read them")
            self.arrays = loaded[0]
            self._offsets()

    def __len__(self) -> int:
        return len(self.arrays["rows"])

    def select(self, max_seq_len: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[tuple[int, str, str]]]:
        """For a max_seq_len: the samples kept (indices into the arrays), their lengths and images kept, and the
        samples it makes bad (row, reason, detail): too long, or an image of a kept turn missing."""
        a = self.arrays
        full = np.asarray(a["full_len"], dtype=np.int64)
        limit = np.iinfo(np.int64).max if max_seq_len is None else max_seq_len
        lengths = np.minimum(full, limit)
        is_text = np.asarray(a["kind"]) == 1
        over = (full > limit) & ~is_text
        if over.any():
            sample_of_turn = np.repeat(np.arange(len(full)), a["n_turn"])
            ends = np.asarray(a["turn_ends"], dtype=np.int64)
            fitting = np.zeros(len(full), dtype=np.int64)
            np.maximum.at(fitting, sample_of_turn, np.where(ends <= limit, ends, 0))
            lengths[over] = fitting[over]
        starts = np.asarray(a["img_at"], dtype=np.int64) + self._image_rank() * self.image.image_token_len
        sample_of_image = np.repeat(np.arange(len(full)), a["n_img"])
        kept = starts < lengths[sample_of_image]
        n_images = np.bincount(sample_of_image, weights=kept, minlength=len(full)).astype(np.int64)
        reasons: dict[int, tuple[str, str]] = {}
        for k in np.flatnonzero(over & (lengths == 0)):
            first = int(a["turn_ends"][self.turn_off[k]])
            reasons[int(k)] = ("too_long", f"first answer ends at token {first} > max_seq_len {max_seq_len}")
        for k in np.flatnonzero(is_text & (lengths < 2)):
            reasons[int(k)] = ("no_supervised_tokens", f"max_seq_len {max_seq_len} leaves under two tokens")
        for index, reason, detail in self.faults:
            k = int(sample_of_image[index])
            if kept[index] and k not in reasons:
                reasons[k] = (reason, detail)
        good = np.ones(len(full), dtype=bool)
        good[list(reasons)] = False
        bad = [(int(a["rows"][k]), reason, detail) for k, (reason, detail) in reasons.items()]
        keep = np.flatnonzero(good)
        return keep, lengths[keep], n_images[keep], bad

    def _image_rank(self) -> np.ndarray:
        """Each image's place among its sample's images (0, 1, ...)."""
        n_img = np.asarray(self.arrays["n_img"], dtype=np.int64)
        return np.arange(int(n_img.sum())) - np.repeat(self.img_off[:-1], n_img)

    def recheck_faults(self) -> None:
        """Drop the faults of images that are now present (a folder fixed since the encodings were stored)."""
        if not self.faults:
            return
        folder = ImageFolder(self.images_dir)
        still = []
        for index, reason, detail in self.faults:
            name = image_names(self.arrays, self.name_off, index, 1)[0]
            try:
                folder.resolve(name)
            except BadSample:
                still.append((index, reason, detail))
        self.faults = still

    def tokens(self, k: int, length: int, n_images: int) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids int64, labels int64) of sample k cut to `length`, its first n_images placeholder runs in place."""
        a = self.arrays
        start, end = self.tok_off[k], self.tok_off[k + 1]
        ids = np.asarray(a["ids"][start:end], dtype=np.int64)
        labels = np.where(np.asarray(a["sup"][start:end], dtype=bool), ids, IGNORE_INDEX)
        if n_images:
            at = np.repeat(np.asarray(a["img_at"][self.img_off[k]:self.img_off[k] + n_images]),
                           self.image.image_token_len)
            ids = np.insert(ids, at, self.image.image_token_id)
            labels = np.insert(labels, at, IGNORE_INDEX)
        return ids[:length], labels[:length]

    def names(self, k: int, n_images: int) -> list[ImageRef]:
        return image_names(self.arrays, self.name_off, int(self.img_off[k]), n_images)


def open_encodings(job: PassJob, root: Path | None, workers: int | None = None) -> tuple[Encodings, str]:
    """The pass's encodings: read from root/<key> when a run made them before, else built (and stored there when
    root is given). Returns them with one line saying which, for the run log."""
    began = time.perf_counter()
    images_dir = Path(job.reader.images_dir or ".")
    key = job.key() if root is not None else None
    if key is not None and (loaded := load(root / key)) is not None:
        encodings = Encodings(*loaded, job.image, images_dir, stored_at=root / key)
        encodings.recheck_faults()
        return encodings, f"encodings read from {root / key} in {time.perf_counter() - began:.1f} s"
    workers = workers or default_workers()
    arrays, bad, note = encode_file(job, workers)
    took = time.perf_counter() - began
    how = f"encoded {len(job.reader)} records in {took:.1f} s ({workers} process(es)){note}"
    if key is None:
        return Encodings(arrays, bad, job.image, images_dir), how
    meta = {"version": VERSION, "data": os.path.abspath(job.reader.path), "records": len(job.reader),
            "samples": int(len(arrays["rows"])), "seconds": round(took, 2)}
    try:
        folder = store(root, key, arrays, bad, meta)
    except OSError as err:
        return Encodings(arrays, bad, job.image, images_dir), f"{how}; not kept on disk ({root}: {err.strerror or err})"
    loaded = load(folder)
    if loaded is None:  # written but unreadable: use what is in memory
        return Encodings(arrays, bad, job.image, images_dir), f"{how}; kept in {folder} but not readable back"
    return Encodings(*loaded, job.image, images_dir, stored_at=folder), f"{how}, kept in {folder}"
