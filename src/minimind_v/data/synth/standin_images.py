"""Photo-like stand-in JPEGs, fast: a muted smooth colour field plus a detail layer of texture and grain.

The detail is what a photo's JPEG spends its bytes on; its strength differs from layer to layer, so the
byte sizes spread as a real folder's do. A few fields and layers are drawn once per seed, four times the
image's side; each image adds a window of one field to a window of one layer, at offsets of its own (C-level
image arithmetic, so the JPEG encoder is most of the cost). Image `index` depends on (seed, salt, index)
alone, so any split of the work over processes writes the same bytes.
"""

from __future__ import annotations

import functools
import io
import multiprocessing
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops


@dataclass(frozen=True)
class Look:
    size: int = 128
    """Side of the square images in pixels (the original resized every image to 128x128)."""
    quality: int = 85
    """JPEG quality."""
    cells: int = 32
    """A colour field is a cells x cells grid of random colours stretched over four times the image's side."""
    tint: int = 32
    """Largest step of a colour-field cell's channels from its grey level: muted colours, as photos have."""
    texture: float = 0.22
    """Strength of the mid-scale luminance texture (share of its full contrast) in a detail layer."""
    grain: float = 10.0
    """Amplitude of the per-pixel grain in a detail layer, in grey levels."""
    detail: tuple[float, float] = (0.45, 1.55)
    """Range of a detail layer's strength, one draw per layer: what spreads the JPEG sizes."""
    headroom: int = 48
    """A detail layer stays within +-headroom grey levels, a colour field that far from 0 and 255."""
    bank: int = 16
    """Colour fields and detail layers drawn once per seed; each image takes a window of one of each."""


DRAW_BLOCK = 1024
"""Images whose windows are drawn together: image i's come from block i // DRAW_BLOCK, whoever writes it."""


def jpeg_bytes(look: Look, seed: int, salt: int, index: int) -> bytes:
    """The JPEG file of image `index`: a colour field plus a detail layer, each a window at the image's own
    offset into one of the shared ones (C-level image arithmetic: the JPEG encoder is most of the cost)."""
    fields, details = _bank(look, seed, salt)
    f, d, x, y, u, v = (int(k) for k in _windows(look, seed, salt, index // DRAW_BLOCK)[index % DRAW_BLOCK])
    s = look.size
    field, detail = fields[f].crop((x, y, x + s, y + s)), details[d].crop((u, v, u + s, v + s))
    buffer = io.BytesIO()
    ImageChops.add_modulo(field, detail).save(buffer, format="JPEG", quality=look.quality)  # the headroom: no wrap
    return buffer.getvalue()


@functools.lru_cache(maxsize=2)
def _windows(look: Look, seed: int, salt: int, block: int) -> np.ndarray:
    """(DRAW_BLOCK, 6): each image's colour field, detail layer, and the left and top of each one's window."""
    highs = (look.bank, look.bank) + (3 * look.size,) * 4
    return np.random.default_rng([seed, salt, block]).integers(0, highs, (DRAW_BLOCK, len(highs)))


@functools.lru_cache(maxsize=2)
def _bank(look: Look, seed: int, salt: int) -> tuple[list[Image.Image], list[Image.Image]]:
    """Smooth colour fields, and grey detail layers (texture + grain) stored modulo 256; four times the image's
    side, so that the windows of 600K images hardly ever meet twice."""
    rng, side, room = np.random.default_rng([seed, salt]), 4 * look.size, look.headroom
    grey = rng.integers(room + look.tint, 256 - room - look.tint, (look.bank, look.cells, look.cells, 1))
    cells = (grey + rng.integers(-look.tint, look.tint + 1, (look.bank, look.cells, look.cells, 3))).astype(np.uint8)
    fields = [Image.fromarray(c).resize((side, side), Image.Resampling.BILINEAR) for c in cells]
    coarse = rng.integers(0, 256, (look.bank, side // 4, side // 4), dtype=np.uint8)
    textures = np.stack([np.asarray(Image.fromarray(c).resize((side, side), Image.Resampling.BILINEAR), np.float32)
                         for c in coarse]) - 128
    grains = rng.uniform(-look.grain, look.grain, (look.bank, side, side)).astype(np.float32)
    strengths = rng.uniform(*look.detail, (look.bank, 1, 1)).astype(np.float32)
    layers = np.clip(np.rint(strengths * (textures * look.texture + grains)), -room, room).astype(np.int16) % 256
    return fields, [Image.fromarray(layer.astype(np.uint8)).convert("RGB") for layer in layers]


@dataclass(frozen=True)
class ImageJob:
    """Images start..stop-1 of a folder, named by `name.format(index)`."""

    folder: str
    name: str
    look: Look
    seed: int
    salt: int
    start: int
    stop: int


def write_images(job: ImageJob) -> int:
    """Write the job's images; return the bytes written."""
    folder, total = Path(job.folder), 0
    for index in range(job.start, job.stop):
        data = jpeg_bytes(job.look, job.seed, job.salt, index)
        (folder / job.name.format(index)).write_bytes(data)
        total += len(data)
    return total


def workers_available() -> int:
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@contextmanager
def images_in_background(jobs: list[ImageJob], workers: int) -> Iterator[Callable[[], list[int]]]:
    """Start writing the jobs in `workers` processes (when more than one) and give a function that waits for them
    and returns each job's bytes; leaving the block early stops the workers."""
    if workers <= 1 or len(jobs) <= 1:
        yield lambda: [write_images(job) for job in jobs]
        return
    # spawn, not fork: the caller may hold threads (torch, a test runner) that a forked child would inherit locked
    with multiprocessing.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
        yield pool.map_async(write_images, jobs, chunksize=1).get
