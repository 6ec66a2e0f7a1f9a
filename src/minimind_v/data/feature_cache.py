"""Feature cache for a frozen vision tower: encode each image once, read it back from memory-mapped shards.

A frozen CLIP ViT-B/16 costs ~0.5 s per image on CPU and gives the same answer every epoch and
every stage, so encoding it again is pure waste. The cache keeps one row of (n_patches, dim)
features per distinct image, in one of two forms:

- "int8" (the default): each patch's features divided by their largest magnitude / 127 and rounded, with that
  scale kept in fp16; 1 byte per value plus 2 per patch, half of fp16 (CLIP ViT-B/16 at 196 x 768: 149 KB per image
  against 294 KB, 87 GB against 175 GB for the 595K pretrain images). docs/experiments.md has its loss against fp16.
- "float16": the features as the tower gave them, 2 bytes per value.

    ROOT/<fingerprint>/<dtype>/meta.json              what the fingerprint stands for; n_patches, dim, dtype
    ROOT/<fingerprint>/<dtype>/index-<builder>.jsonl  one line per finished shard (its content keys, broken images)
                                                      and one per build of the path index; appended, never rewritten
    ROOT/<fingerprint>/<dtype>/<shard>.q  (.scale)    the rows, opened with numpy.memmap

- Keyed by content: blake2b of the image bytes, so a copied or renamed image is not encoded twice.
  The path index (path, size, mtime) spares a 600K-image folder from being re-hashed on every run.
- Invalidated by construction: the fingerprint covers the tower's config, its weights and the
  image preprocessing, and each fingerprint has its own subdirectory. A changed tower never reads
  stale features; delete old subdirectories to reclaim the disk.
- A shard is written, flushed, and only then entered in its builder's index, so an interrupted build loses at
  most the shard it was writing (a torn last index line is ignored).
- Several builders at once: each process (each DDP rank) writes its own shards and its own index file, so
  `build(..., share=(rank, world))` splits the images across ranks with no lock and no rank waiting on another's
  whole build; `reload()` then sees everyone's shards.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import os
import shutil
import time
import uuid
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

DTYPES = ("int8", "float16")
LAYOUT = 2


class NotCached(KeyError):
    """The image has no features in the cache (not built yet, or the file changed since)."""


class BrokenImage(ValueError):
    """The build pass could not decode or encode this image; the message says why."""


class NoRoom(OSError):
    """The features would not fit on the cache's disk (found before encoding, or when a write failed)."""


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


def disk_bytes(n_images: int, n_patches: int, dim: int, dtype: str = "float16") -> int:
    per_patch = dim + 2 if dtype == "int8" else 2 * dim
    return n_images * n_patches * per_patch


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def quantize(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, P, D) features -> int8 values and one fp16 scale per patch (largest magnitude / 127)."""
    features = features.float()
    scale = (features.abs().amax(dim=-1, keepdim=True) / 127).clamp_min(1e-8).half()
    values = torch.round(features / scale.float()).clamp_(-127, 127).to(torch.int8)
    return values, scale.squeeze(-1)


def dequantize(values: np.ndarray, scale: np.ndarray) -> torch.Tensor:
    return (torch.from_numpy(np.asarray(values, dtype=np.float32)) * torch.from_numpy(
        np.asarray(scale, dtype=np.float32))[..., None]).half()


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
    seconds: float = 0.0
    """Time spent encoding (decoding included)."""
    index_writes: int = 0
    """Times an index file was opened for writing (one per build)."""


class FeatureCache:
    """Patch features of one vision tower, one row per distinct image."""

    def __init__(self, root: str | os.PathLike, fingerprint: str, n_patches: int, dim: int,
                 describe: Mapping[str, Any] | None = None, dtype: str = "int8") -> None:
        if dtype not in DTYPES:
            raise ValueError(f"feature cache dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
        self.dir = Path(root) / fingerprint / dtype
        self.n_patches, self.dim, self.dtype = n_patches, dim, dtype
        self.dir.mkdir(parents=True, exist_ok=True)
        self._write_meta(fingerprint, describe or {})
        self._shards: dict[str, tuple[np.memmap, np.memmap | None]] = {}
        self.reload()

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
        values, scale = self._shard(shard)
        if scale is None:
            return torch.from_numpy(np.array(values[row]))
        return dequantize(values[row], scale[row])

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
        self._new_files[path] = self._files[path]
        return key

    def __getstate__(self) -> dict[str, Any]:
        # Sent to spawned DataLoader workers: they map the shards themselves rather than receive copies.
        return {**self.__dict__, "_shards": {}}

    def _shard(self, shard: str) -> tuple[np.memmap, np.memmap | None]:
        # Opened lazily, so DataLoader workers forked after construction map their own views.
        if shard not in self._shards:
            rows, shape = self._shard_rows[shard], (self._shard_rows[shard], self.n_patches, self.dim)
            if self.dtype == "int8":
                self._shards[shard] = (np.memmap(self.dir / f"{shard}.q", dtype=np.int8, mode="r", shape=shape),
                                       np.memmap(self.dir / f"{shard}.scale", dtype=np.float16, mode="r",
                                                 shape=(rows, self.n_patches)))
            else:
                self._shards[shard] = (np.memmap(self.dir / f"{shard}.f16", dtype=np.float16, mode="r",
                                                 shape=shape), None)
        return self._shards[shard]

    def reload(self) -> None:
        """Read every builder's index (what other processes added since, too)."""
        self._shard_rows: dict[str, int] = {}
        self._keys: dict[str, tuple[str, int]] = {}
        self._files: dict[str, list[Any]] = {}
        self._new_files: dict[str, list[Any]] = {}
        self._broken: dict[str, str] = {}
        for path in sorted(self.dir.glob("index-*.jsonl")):
            for entry in _entries(path):
                self._files.update(entry.get("files", {}))
                self._broken.update(entry.get("broken", {}))
                if "shard" in entry:
                    self._shard_rows[entry["shard"]] = len(entry["keys"])
                    self._keys.update((key, (entry["shard"], row)) for row, key in enumerate(entry["keys"]))

    # ---- writing -------------------------------------------------------------------------

    def build(self, images: Iterable[ImageRef], preprocess: Callable[[Image.Image], torch.Tensor],
              encode: Callable[[torch.Tensor], torch.Tensor], batch_size: int = 256, shard_rows: int = 4096,
              load: Callable[[ImageRef], Image.Image] = load_image, workers: int = min(8, os.cpu_count() or 1),
              log: Callable[[str], None] = print, share: tuple[int, int] = (0, 1)) -> BuildReport:
        """Encode every image not yet cached, `batch_size` at a time; broken ones are recorded, not raised.

        `load` opens one image as RGB (the data layer's checks by default); `preprocess` turns it into
        (3, H, W) pixels; `encode` turns (N, 3, H, W) pixels into (N, n_patches, dim) features (the
        frozen tower, on whatever device the caller chose). `workers` threads decode the next batch
        while the current one is encoded: JPEG decoding, not the tower, is the bottleneck on a GPU.
        `share=(rank, world)`: this process takes every world-th image from the rank-th on (DDP ranks build
        together, each its share); call `reload()` once all have finished to read them all.
        """
        report = BuildReport()
        rank, world = share
        todo = self._plan((image for i, image in enumerate(images) if i % world == rank), report)
        report.planned_bytes = disk_bytes(len(todo), self.n_patches, self.dim, self.dtype)
        log(f"feature cache {self.dir}: {len(todo)} new images x {self.n_patches} x {self.dim} in {self.dtype} = "
            f"{format_bytes(report.planned_bytes)} ({report.reused} already cached"
            f"{f'; rank {rank} of {world}' if world > 1 else ''})")
        free = shutil.disk_usage(self.dir).free
        if report.planned_bytes > free:
            raise NoRoom(f"feature cache {self.dir}: {len(todo)} images need {format_bytes(report.planned_bytes)}, "
                         f"{format_bytes(free)} free")
        try:
            self._encode_all(todo, load, preprocess, encode, batch_size, shard_rows, workers, report, rank)
        except OSError as err:
            if err.errno == errno.ENOSPC:
                raise NoRoom(f"feature cache {self.dir}: the disk filled up while writing ({err})") from None
            raise
        if report.encoded:
            log(f"feature cache: {report.encoded} images encoded in {report.seconds:.1f} s "
                f"({1000 * report.seconds / report.encoded:.2f} ms per image)")
        if report.broken:
            log(f"feature cache: {len(report.broken)} broken image(s), e.g. {next(iter(report.broken.items()))}")
        return report

    def _encode_all(self, todo: list[tuple[str, ImageRef]], load: Callable[[ImageRef], Image.Image],
                    preprocess: Callable[[Image.Image], torch.Tensor], encode: Callable[[torch.Tensor], torch.Tensor],
                    batch_size: int, shard_rows: int, workers: int, report: BuildReport, rank: int) -> None:
        decode = functools.partial(_decode, load=load, preprocess=preprocess)
        began = time.perf_counter()
        with open(self.dir / f"index-{rank}-{uuid.uuid4().hex[:8]}.jsonl", "a", encoding="utf-8") as index, \
                ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            report.index_writes += 1
            _append(index, {"files": self._new_files})
            self._new_files = {}
            for start in range(0, len(todo), shard_rows):
                self._build_shard(todo[start:start + shard_rows], decode, encode, batch_size, pool, report, index,
                                  f"shard-{Path(index.name).stem[6:]}-{start // shard_rows:05d}")
        report.seconds = time.perf_counter() - began

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
                     report: BuildReport, index: Any, name: str) -> None:
        values, scale = self._open_shard(name, len(items))
        chunks = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
        pending = [pool.submit(decode, image) for _, image in chunks[0]]
        keys: list[str] = []
        broken: dict[str, str] = {}
        for number, chunk in enumerate(chunks):
            decoded = [future.result() for future in pending]
            if number + 1 < len(chunks):  # decode the next batch while this one is encoded
                pending = [pool.submit(decode, image) for _, image in chunks[number + 1]]
            pixels, good = self._keep_good(chunk, decoded, report, broken)
            if not good:
                continue
            with torch.no_grad():
                feats = encode(torch.stack(pixels))
            if feats.shape[1:] != (self.n_patches, self.dim):
                raise ValueError(f"encoder returned {tuple(feats.shape)}, cache expects (N, {self.n_patches}, {self.dim})")
            rows = slice(len(keys), len(keys) + len(good))
            if scale is None:
                values[rows] = feats.detach().to("cpu", torch.float16).numpy()
            else:
                q, s = quantize(feats.detach())
                values[rows], scale[rows] = q.cpu().numpy(), s.cpu().numpy()
            keys += good
        for array in (values, scale):
            if array is not None:
                array.flush()
        _append(index, {"shard": name, "keys": keys, "broken": broken})
        self._shard_rows[name] = len(keys)
        self._keys.update((key, (name, row)) for row, key in enumerate(keys))
        self._broken.update(broken)
        report.encoded += len(keys)

    def _open_shard(self, name: str, rows: int) -> tuple[np.memmap, np.memmap | None]:
        shape = (max(rows, 1), self.n_patches, self.dim)
        if self.dtype == "float16":
            return np.memmap(self.dir / f"{name}.f16", dtype=np.float16, mode="w+", shape=shape), None
        return (np.memmap(self.dir / f"{name}.q", dtype=np.int8, mode="w+", shape=shape),
                np.memmap(self.dir / f"{name}.scale", dtype=np.float16, mode="w+", shape=shape[:2]))

    def _keep_good(self, chunk: list[tuple[str, ImageRef]], decoded: list[torch.Tensor | str],
                   report: BuildReport, broken: dict[str, str]) -> tuple[list[torch.Tensor], list[str]]:
        pixels, keys = [], []
        for (key, image), result in zip(chunk, decoded):
            if isinstance(result, str):
                broken[key] = result
                report.broken[_describe(image)] = result
            else:
                pixels.append(result)
                keys.append(key)
        return pixels, keys

    # ---- files ---------------------------------------------------------------------------

    def _write_meta(self, fingerprint: str, describe: Mapping[str, Any]) -> None:
        meta_path = self.dir / "meta.json"
        meta = {"fingerprint": fingerprint, "n_patches": self.n_patches, "dim": self.dim, "dtype": self.dtype,
                "layout": LAYOUT, "describe": dict(describe)}
        if meta_path.exists():
            old = json.loads(meta_path.read_text())
            if (old["n_patches"], old["dim"]) != (self.n_patches, self.dim):
                raise ValueError(f"{meta_path}: cache holds {old['n_patches']}x{old['dim']} features, "
                                 f"asked for {self.n_patches}x{self.dim}")
            return
        atomic_write_text(meta_path, json.dumps(meta, indent=1, default=str))


def _append(index: Any, entry: dict[str, Any]) -> None:
    """One index line, on disk before the build goes on (the shard it names is already flushed)."""
    index.write(json.dumps(entry, separators=(",", ":")) + "\n")
    index.flush()
    os.fsync(index.fileno())


def _entries(path: Path) -> Iterable[dict[str, Any]]:
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            try:
                yield json.loads(line)
            except json.JSONDecodeError:  # the torn last line of an interrupted build: its shard is not entered
                return


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
