"""Feature cache for a frozen vision tower: encode each image once, read it back from memory-mapped fp16 shards.

A frozen CLIP ViT-B/16 costs ~0.5 s per image on CPU and gives the same answer every epoch and
every stage, so encoding it again is pure waste. The cache keeps one row of (n_patches, dim) fp16
features per distinct image:

    ROOT/<fingerprint>/meta.json        what the fingerprint stands for; n_patches, dim
    ROOT/<fingerprint>/index.json       content key -> (shard, row); path -> (size, mtime_ns, key); broken images
    ROOT/<fingerprint>/shard_00000.f16  raw fp16 rows, (rows, n_patches, dim), opened with numpy.memmap

- Keyed by content: blake2b of the image bytes, so a copied or renamed image is not encoded twice.
  The path index (path, size, mtime) spares a 600K-image folder from being re-hashed on every run.
- Invalidated by construction: the fingerprint covers the tower's config, its weights and the
  image preprocessing, and each fingerprint has its own subdirectory. A changed tower never reads
  stale features; delete old subdirectories to reclaim the disk.
- Shards are written once, flushed, and only then entered into the index (replaced atomically), so
  an interrupted build loses at most the shard it was writing.
- One writer at a time: build on one process (rank 0), then open for reading everywhere.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from minimind_v.data.formats import BadSample, ImageRef
from minimind_v.data.images import load_image
from minimind_v.fileio import atomic_write_text

DTYPE = np.float16
INDEX_VERSION = 1


class NotCached(KeyError):
    """The image has no features in the cache (not built yet, or the file changed since)."""


class BrokenImage(ValueError):
    """The build pass could not decode or encode this image; the message says why."""


def content_key(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def tower_fingerprint(tower: torch.nn.Module, preprocess: Mapping[str, Any]) -> str:
    """A digest of everything that decides the features: the tower's config, its weights and the preprocessing."""
    digest = hashlib.blake2b(digest_size=10)
    config = getattr(tower, "config", None)
    config_dict = config.to_dict() if hasattr(config, "to_dict") else {}
    # transformers stamps its own version into to_dict(); it does not change the features.
    config_dict.pop("transformers_version", None)
    digest.update(json.dumps(config_dict, sort_keys=True, default=str).encode())
    digest.update(json.dumps(dict(preprocess), sort_keys=True, default=str).encode())
    for name, tensor in tower.state_dict().items():
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def disk_bytes(n_images: int, n_patches: int, dim: int) -> int:
    return n_images * n_patches * dim * np.dtype(DTYPE).itemsize


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


@dataclass
class BuildReport:
    """What one build pass did."""

    encoded: int = 0
    """Images encoded now."""
    reused: int = 0
    """Images whose features were already in the cache."""
    broken: dict[str, str] = field(default_factory=dict)
    """Image (path or content key) -> why it could not be encoded."""
    planned_bytes: int = 0
    """Disk the new features were expected to take, announced before encoding."""


class FeatureCache:
    """Patch features of one vision tower, one row per distinct image."""

    def __init__(self, root: str | os.PathLike, fingerprint: str, n_patches: int, dim: int,
                 describe: Mapping[str, Any] | None = None) -> None:
        self.dir = Path(root) / fingerprint
        self.n_patches, self.dim = n_patches, dim
        self.dir.mkdir(parents=True, exist_ok=True)
        self._write_meta(fingerprint, describe or {})
        self._load_index()
        self._shards: dict[int, np.memmap] = {}

    # ---- reading -------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._keys)

    def features(self, image: ImageRef) -> torch.Tensor:
        """(n_patches, dim) fp16 features of one image; NotCached or BrokenImage when there are none."""
        key = self.key_of(image)
        if key in self._broken:
            raise BrokenImage(self._broken[key])
        if key not in self._keys:
            raise NotCached(f"{_describe(image)}: no cached features")
        shard, row = self._keys[key]
        return torch.from_numpy(np.array(self._shard(shard)[row]))

    def __contains__(self, image: ImageRef) -> bool:
        return self.key_of(image) in self._keys

    def key_of(self, image: ImageRef) -> str:
        """The content key of an image; a file whose size and mtime match the path index is not re-read."""
        if isinstance(image, bytes):
            return content_key(image)
        path = os.path.abspath(image)
        stat = os.stat(path)
        known = self._files.get(path)
        if known is not None and known[0] == stat.st_size and known[1] == stat.st_mtime_ns:
            return known[2]
        with open(path, "rb") as fh:
            key = content_key(fh.read())
        self._files[path] = [stat.st_size, stat.st_mtime_ns, key]
        return key

    def __getstate__(self) -> dict[str, Any]:
        # Sent to spawned DataLoader workers: they map the shards themselves rather than receive copies.
        return {**self.__dict__, "_shards": {}}

    def _shard(self, shard: int) -> np.memmap:
        # Opened lazily, so DataLoader workers forked after construction map their own views.
        if shard not in self._shards:
            rows = self._shard_rows[shard]
            self._shards[shard] = np.memmap(self._shard_path(shard), dtype=DTYPE, mode="r",
                                            shape=(rows, self.n_patches, self.dim))
        return self._shards[shard]

    # ---- writing -------------------------------------------------------------------------

    def build(self, images: Iterable[ImageRef], preprocess: Callable[[Image.Image], torch.Tensor],
              encode: Callable[[torch.Tensor], torch.Tensor], batch_size: int = 32, shard_rows: int = 4096,
              load: Callable[[ImageRef], Image.Image] = load_image, workers: int = min(8, os.cpu_count() or 1),
              log: Callable[[str], None] = print) -> BuildReport:
        """Encode every image not yet cached, `batch_size` at a time; broken ones are recorded, not raised.

        `load` opens one image as RGB (the data layer's checks by default); `preprocess` turns it into
        (3, H, W) pixels; `encode` turns (N, 3, H, W) pixels into (N, n_patches, dim) features (the
        frozen tower, on whatever device the caller chose). `workers` threads decode the next batch
        while the current one is encoded: JPEG decoding, not the tower, is the bottleneck on a GPU.
        """
        report = BuildReport()
        todo = self._plan(images, report)
        report.planned_bytes = disk_bytes(len(todo), self.n_patches, self.dim)
        log(f"feature cache {self.dir}: {len(todo)} new images x {self.n_patches} x {self.dim} x 2 bytes = "
            f"{format_bytes(report.planned_bytes)} ({report.reused} already cached)")
        decode = functools.partial(_decode, load=load, preprocess=preprocess)
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            for start in range(0, len(todo), shard_rows):
                self._build_shard(todo[start:start + shard_rows], decode, encode, batch_size, pool, report)
        self._save_index()
        if report.broken:
            log(f"feature cache: {len(report.broken)} broken image(s), e.g. {next(iter(report.broken.items()))}")
        return report

    def _plan(self, images: Iterable[ImageRef], report: BuildReport) -> list[tuple[str, ImageRef]]:
        """Distinct images still to encode, as (key, image); counts those already cached or known broken."""
        todo: dict[str, ImageRef] = {}
        for image in images:
            try:
                key = self.key_of(image)
            except OSError as err:
                report.broken[_describe(image)] = f"cannot read: {err.strerror or err}"
                continue
            if key in self._broken:
                report.broken[_describe(image)] = self._broken[key]
            elif key in self._keys:
                report.reused += 1
            else:
                todo.setdefault(key, image)
        return list(todo.items())

    def _build_shard(self, items: list[tuple[str, ImageRef]], decode: Callable[[ImageRef], torch.Tensor | str],
                     encode: Callable[[torch.Tensor], torch.Tensor], batch_size: int, pool: ThreadPoolExecutor,
                     report: BuildReport) -> None:
        shard = len(self._shard_rows)
        out = np.memmap(self._shard_path(shard), dtype=DTYPE, mode="w+",
                        shape=(len(items), self.n_patches, self.dim))
        chunks = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
        pending = [pool.submit(decode, image) for _, image in chunks[0]]
        placed: dict[str, list[int]] = {}
        for index, chunk in enumerate(chunks):
            decoded = [future.result() for future in pending]
            if index + 1 < len(chunks):  # decode the next batch while this one is encoded
                pending = [pool.submit(decode, image) for _, image in chunks[index + 1]]
            pixels, keys = self._keep_good(chunk, decoded, report)
            if not keys:
                continue
            with torch.no_grad():
                feats = encode(torch.stack(pixels))
            if feats.shape[1:] != (self.n_patches, self.dim):
                raise ValueError(f"encoder returned {tuple(feats.shape)}, cache expects (N, {self.n_patches}, {self.dim})")
            row = len(placed)
            out[row:row + len(keys)] = feats.detach().to("cpu", torch.float16).numpy()
            placed.update((key, [shard, row + i]) for i, key in enumerate(keys))
        out.flush()
        del out
        self._shard_rows.append(len(items))
        self._keys.update(placed)
        report.encoded += len(placed)
        self._save_index()

    def _keep_good(self, chunk: list[tuple[str, ImageRef]], decoded: list[torch.Tensor | str],
                   report: BuildReport) -> tuple[list[torch.Tensor], list[str]]:
        pixels, keys = [], []
        for (key, image), result in zip(chunk, decoded):
            if isinstance(result, str):
                self._broken[key] = result
                report.broken[_describe(image)] = result
            else:
                pixels.append(result)
                keys.append(key)
        return pixels, keys

    # ---- files ---------------------------------------------------------------------------

    def _shard_path(self, shard: int) -> Path:
        return self.dir / f"shard_{shard:05d}.f16"

    def _write_meta(self, fingerprint: str, describe: Mapping[str, Any]) -> None:
        meta_path = self.dir / "meta.json"
        meta = {"fingerprint": fingerprint, "n_patches": self.n_patches, "dim": self.dim, "dtype": "float16",
                "describe": dict(describe)}
        if meta_path.exists():
            old = json.loads(meta_path.read_text())
            if (old["n_patches"], old["dim"]) != (self.n_patches, self.dim):
                raise ValueError(f"{meta_path}: cache holds {old['n_patches']}x{old['dim']} features, "
                                 f"asked for {self.n_patches}x{self.dim}")
            return
        atomic_write_text(meta_path, json.dumps(meta, indent=1, default=str))

    def _load_index(self) -> None:
        path = self.dir / "index.json"
        data = json.loads(path.read_text()) if path.exists() else {}
        self._shard_rows: list[int] = data.get("shard_rows", [])
        self._keys: dict[str, list[int]] = data.get("keys", {})
        self._files: dict[str, list[Any]] = data.get("files", {})
        self._broken: dict[str, str] = data.get("broken", {})

    def _save_index(self) -> None:
        data = {"version": INDEX_VERSION, "shard_rows": self._shard_rows, "keys": self._keys,
                "files": self._files, "broken": self._broken}
        atomic_write_text(self.dir / "index.json", json.dumps(data, separators=(",", ":")))


def _decode(image: ImageRef, load: Callable[[ImageRef], Image.Image],
            preprocess: Callable[[Image.Image], torch.Tensor]) -> torch.Tensor | str:
    """Pixels of one image, or why there are none: any decoder failure is one broken image, not a crashed build."""
    try:
        return preprocess(load(image))
    except Exception as err:
        detail = str(err) if isinstance(err, BadSample) else f"{type(err).__name__}: {err}"
        return f"broken image: {detail}".splitlines()[0]


def _describe(image: ImageRef) -> str:
    return f"<{len(image)} bytes {content_key(image)[:12]}>" if isinstance(image, bytes) else os.fspath(image)
