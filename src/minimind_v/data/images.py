"""Images: safe loading, conversion to RGB, and the vision tower's own preprocessing.

Preprocessing follows the tower's preprocessor_config.json (CLIP: resize the shortest side with
bicubic, centre crop, rescale to [0, 1], normalise with the config's mean and std; SigLIP: resize to
a fixed height x width), computed with PIL + numpy and equal to transformers' CLIPImageProcessorPil.

RGB conversion: EXIF orientation applied first; CMYK, palette, grayscale and 16-bit images are
converted; transparency (RGBA, LA, palette with transparency) is composited on white, because a
transparent background is meant to be seen as blank paper, and dropping alpha instead exposes
whatever colour the invisible pixels happen to hold (often black).

Safety: an image whose header announces more than `max_pixels` pixels is refused before decoding
(decompression bombs), and an image path must stay inside the image folder (no "..", no absolute
path elsewhere, no symlink leading out).
"""

from __future__ import annotations

import io
import os
import stat
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from minimind_v.data.formats import BadSample
from minimind_v.errors import UserError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
RESCALE_FACTOR = 1 / 255
"""Pixel values 0-255 -> 0-1, every tower family's first step."""
DEFAULT_MAX_PIXELS = 64_000_000


@dataclass
class ImagePreprocessor:
    """What one image goes through on its way to the vision tower; read from preprocessor_config.json."""

    shortest_edge: int | None = 224
    """Resize so the shorter side has this length (CLIP); None: resize to height x width (SigLIP)."""
    height: int = 224
    """Output height (the crop, or the fixed resize)."""
    width: int = 224
    """Output width."""
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD
    rescale_factor: float = RESCALE_FACTOR
    resample: int = Image.Resampling.BICUBIC

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "ImagePreprocessor":
        size = config.get("size", {"shortest_edge": 224})
        if isinstance(size, int):  # older configs: a bare int is the shortest edge
            size = {"shortest_edge": size}
        crop = config.get("crop_size") or {}
        crop = {"height": crop, "width": crop} if isinstance(crop, int) else crop
        crops = config.get("do_center_crop", "shortest_edge" in size)
        shortest = size.get("shortest_edge")
        height = crop.get("height", shortest) if crops else size.get("height", shortest)
        width = crop.get("width", shortest) if crops else size.get("width", shortest)
        return cls(shortest_edge=shortest if "shortest_edge" in size else None, height=int(height), width=int(width),
                   mean=tuple(config.get("image_mean", CLIP_MEAN)), std=tuple(config.get("image_std", CLIP_STD)),
                   rescale_factor=float(config.get("rescale_factor", RESCALE_FACTOR)),
                   resample=int(config.get("resample", Image.Resampling.BICUBIC)))

    @classmethod
    def for_image_size(cls, image_size: int) -> "ImagePreprocessor":
        """CLIP's recipe at another resolution: for a tower trained from scratch (the tiny preset)."""
        return cls(shortest_edge=image_size, height=image_size, width=image_size)

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path) -> "ImagePreprocessor":
        """A local directory, or a hub id already in the Hugging Face cache (nothing is downloaded here)."""
        return cls.from_config(image_processor_config(name_or_path))

    def to_config(self) -> dict[str, Any]:
        """The same settings as a transformers CLIPImageProcessor config (for preprocessor_config.json)."""
        size = {"shortest_edge": self.shortest_edge} if self.shortest_edge else {"height": self.height,
                                                                                   "width": self.width}
        return {"image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": size,
                "do_center_crop": self.shortest_edge is not None,
                "crop_size": {"height": self.height, "width": self.width}, "do_rescale": True,
                "rescale_factor": self.rescale_factor, "do_normalize": True, "image_mean": list(self.mean),
                "image_std": list(self.std), "resample": self.resample, "do_convert_rgb": True}

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """An RGB PIL image -> (3, height, width) float32, normalised."""
        return torch.from_numpy(self.array(image))

    def array(self, image: Image.Image) -> np.ndarray:
        """As __call__, in numpy: data-loader work stays off torch's thread pool, which a busy CPU makes slow."""
        if self.shortest_edge is not None:
            image = image.resize(self._resized_size(image.size), resample=self.resample)
            image = _center_crop(image, self.height, self.width)
        else:
            image = image.resize((self.width, self.height), resample=self.resample)
        pixels = np.asarray(image, dtype=np.float32) * np.float32(self.rescale_factor)  # (H, W, 3)
        pixels = (pixels - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(pixels.transpose(2, 0, 1))

    def pixel_values(self, images: list[Image.Image]) -> torch.Tensor:
        """Any PIL images (converted to RGB as in training) -> (N, 3, height, width), in the order given."""
        return torch.from_numpy(np.stack([self.array(to_rgb(image)) for image in images]))

    def _resized_size(self, size: tuple[int, int]) -> tuple[int, int]:
        width, height = size
        short, long = min(width, height), max(width, height)
        new_long = int(self.shortest_edge * long / short)  # truncation, as transformers does
        return (self.shortest_edge, new_long) if width <= height else (new_long, self.shortest_edge)

    def __repr__(self) -> str:
        return f"ImagePreprocessor({asdict(self)})"


def _center_crop(image: Image.Image, height: int, width: int) -> Image.Image:
    top, left = (image.height - height) // 2, (image.width - width) // 2
    if top < 0 or left < 0:  # smaller than the crop: pad with black around it, as transformers does
        canvas = Image.new("RGB", (max(width, image.width), max(height, image.height)))
        canvas.paste(image, (max(0, -left), max(0, -top)))
        return _center_crop(canvas, height, width)
    return image.crop((left, top, left + width, top + height))


def image_processor_config(name_or_path: str | Path) -> dict[str, Any]:
    """A tower's image-processor settings, read as transformers reads them: its preprocessor_config.json, or
    the "image_processor" entry of the processor_config.json that transformers 5 processors save."""
    from transformers import AutoImageProcessor
    from transformers.utils import logging as hf_logging

    path = Path(name_or_path)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # only its settings are read: a note on which backend it picked is noise
    try:
        return AutoImageProcessor.from_pretrained(str(name_or_path), local_files_only=True).to_dict()
    except Exception as err:  # transformers and huggingface_hub raise several types for "absent" / "offline"
        if path.is_dir():
            raise UserError(f"{path}: no preprocessor_config.json (nor a processor_config.json with an "
                            f"image_processor) in the vision encoder directory") from None
        raise UserError(f"vision encoder {str(name_or_path)!r}: not a local directory and not in the Hugging Face "
                        f"cache (run `minimind-v download` first; {type(err).__name__})") from None
    finally:
        hf_logging.set_verbosity(verbosity)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB, orientation fixed, transparency composited on white."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit samples: PIL's convert("RGB") would clip everything above 255 to white
        pixels = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(pixels / 257.0, 0, 255).round().astype(np.uint8), mode="L")
    elif image.mode == "F":
        image = Image.fromarray(np.clip(np.asarray(image), 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def resolve_image_path(images_dir: Path, name: str) -> Path:
    """`name` inside images_dir, symlinks followed; BadSample when it points outside or does not exist."""
    return ImageFolder(images_dir).resolve(name)


class ImageFolder:
    """A data set's image folder: `resolve(name)` is `resolve_image_path` for many names.

    Resolving a path follows every component (one lstat each), and a data set resolves every sample's
    image in its up-front pass and again every epoch. The folder and each directory under it are resolved
    once per ImageFolder; a name then costs one lstat when it is a plain file, and anything else (a symbolic
    link, a missing or odd name) takes the full resolution and its checks (docs/experiments.md: what it saves).
    """

    def __init__(self, images_dir: Path) -> None:
        self.images_dir = Path(images_dir)
        self.root = self.images_dir.resolve()
        self._dirs: dict[str, Path] = {}
        self._strings: dict[str, str] = {}  # directory under the folder -> its resolved path ("" when outside)

    def resolve(self, name: str) -> Path:
        head, tail = os.path.split(name)
        parent = self._dirs.get(head)
        if parent is None:
            parent = self._dirs[head] = (self.root / head).resolve()
        if tail not in ("", ".", "..") and parent.is_relative_to(self.root):
            path = parent / tail
            try:
                if stat.S_ISREG(os.lstat(path).st_mode):
                    return path
            except OSError:
                pass
        return self._resolve_fully(name)

    def check(self, name: str) -> None:
        """What `resolve` checks, for the up-front pass over every image of a data set: the path of a plain file is
        joined as a string (pathlib's parsing was most of the cost), anything else takes `resolve`."""
        head, tail = os.path.split(name)
        parent = self._strings.get(head)
        if parent is None:
            resolved = (self.root / head).resolve()
            parent = self._strings[head] = str(resolved) if resolved.is_relative_to(self.root) else ""
        if parent and tail not in ("", ".", ".."):
            try:
                if stat.S_ISREG(os.lstat(os.path.join(parent, tail)).st_mode):
                    return
            except OSError:
                pass
        self.resolve(name)

    def _resolve_fully(self, name: str) -> Path:
        path = (self.root / name).resolve()
        if not path.is_relative_to(self.root):
            raise BadSample("image_path", f"image {name!r} lies outside the image folder {self.images_dir}")
        if not path.is_file():
            raise BadSample("missing_image", f"image {name!r} not found in {self.images_dir}")
        return path


def load_image(image: str | Path | bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open a file (a path already checked by `resolve_image_path` when it comes from data) or encoded bytes;
    check the size from the header, decode, convert to RGB. BadSample for anything unusable."""
    if isinstance(image, bytes):
        source: Any = io.BytesIO(image)
        label = f"embedded image ({len(image)} bytes)"
    else:
        source, label = image, f"image {str(image)!r}"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as opened:
                if opened.width * opened.height > max_pixels:
                    raise BadSample("image_too_large", f"{label}: {opened.width}x{opened.height} pixels "
                                                       f"> max_pixels {max_pixels}")
                opened.load()
                return to_rgb(opened)
    except BadSample:
        raise
    except FileNotFoundError:
        raise BadSample("missing_image", f"{label}: no such file") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise BadSample("image_too_large", f"{label}: {err}") from None
    except (OSError, ValueError, SyntaxError, Image.UnidentifiedImageError) as err:
        raise BadSample("bad_image", f"{label}: cannot decode ({err})") from None
