"""Pixels of a scene: a noisy light background, faint lines that are never objects, then the objects."""

from __future__ import annotations

import io
import random

import numpy as np
from PIL import Image, ImageDraw

from minimind_v.data.synth.world import COLORS, GRID, SIZE_FRACTION, Scene


def draw_scene(scene: Scene, rng: random.Random, image_size: int) -> Image.Image:
    """Noisy light background, faint lines, then each object centred in its cell with a small jitter."""
    noise = np.random.default_rng(rng.getrandbits(64))
    base = np.array([rng.randint(200, 240) for _ in range(3)], dtype=np.int16)
    pixels = base + noise.integers(-12, 13, size=(image_size, image_size, 1), dtype=np.int16)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(1, 3)):
        shade = rng.randint(150, 190)
        points = [(rng.randint(0, image_size), rng.randint(0, image_size)) for _ in range(2)]
        draw.line(points, fill=(shade, shade, shade), width=1)
    cell = image_size / GRID
    for obj in scene:
        radius = cell * SIZE_FRACTION[obj.size] / 2 * rng.uniform(0.92, 1.08)
        jitter = cell * 0.06
        cx = (obj.col + 0.5) * cell + rng.uniform(-jitter, jitter)
        cy = (obj.row + 0.5) * cell + rng.uniform(-jitter, jitter)
        _draw_shape(draw, obj.shape, cx, cy, radius, COLORS[obj.color])
    return image


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float,
                fill: tuple[int, int, int]) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        s = r * 0.85  # a square of the same diameter looks bigger than the circle; shrink it to match
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()
