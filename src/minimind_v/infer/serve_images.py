"""serve's image URLs -> PIL images: data: URLs (and http(s) ones when allowed), each bounded in bytes and pixels.

Every refusal is a 400 naming the request field at fault (`param`).
"""

from __future__ import annotations

import base64
import binascii
import urllib.request
import warnings
from typing import Protocol

from PIL import Image

from minimind_v.infer.serve_schema import APIError


class ImageLimits(Protocol):
    """What bounds an image: the fields of ServeOptions of these names."""

    max_image_bytes: int
    max_image_pixels: int
    allow_remote_images: bool


def load_image_url(limits: ImageLimits, url: str, param: str) -> Image.Image:
    """The image at `url` (a data: URL, or http(s) when allowed), checked against the limits."""
    if url.startswith("data:"):
        data = _decode_data_url(url, limits.max_image_bytes, param)
    elif url.startswith(("http://", "https://")):
        if not limits.allow_remote_images:
            raise APIError(400, f"{param}: remote image URLs are disabled on this server (start it with "
                                "--allow-remote-images), send the image as a data: URL", param=param,
                           code="remote_images_disabled")
        data = _fetch(url, limits.max_image_bytes, param)
    else:
        scheme = url.split(":", 1)[0] if ":" in url else url[:16]
        raise APIError(400, f"{param}: unsupported image URL scheme {scheme!r}; use a data: URL", param=param,
                       code="invalid_image_url")
    return _decode_image(data, limits.max_image_pixels, param)


def _decode_data_url(url: str, max_bytes: int, param: str) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise APIError(400, f"{param}: expected data:image/...;base64,<data>", param=param, code="invalid_image_url")
    if len(payload) * 3 // 4 > max_bytes + 3:
        raise _too_large(param, f"image exceeds the limit of {max_bytes} bytes")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, f"{param}: invalid base64 data", param=param, code="invalid_base64") from None
    if len(data) > max_bytes:
        raise _too_large(param, f"image of {len(data)} bytes exceeds the limit of {max_bytes}")
    return data


def _fetch(url: str, max_bytes: int, param: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 (http(s) only, checked above)
            data = response.read(max_bytes + 1)
    except OSError as err:
        raise APIError(400, f"{param}: cannot fetch the image ({err})", param=param, code="image_fetch_failed") from None
    if len(data) > max_bytes:
        raise _too_large(param, f"image exceeds the limit of {max_bytes} bytes")
    return data


def _decode_image(data: bytes, max_pixels: int, param: str) -> Image.Image:
    from minimind_v.data.formats import BadSample
    from minimind_v.data.images import load_image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            return load_image(data, max_pixels=max_pixels)
        except BadSample as err:
            if err.reason == "image_too_large":
                raise _too_large(param, f"image too large: {err.detail}") from None
            raise APIError(400, f"{param}: not a decodable image", param=param, code="invalid_image") from None


def _too_large(param: str, message: str) -> APIError:
    return APIError(400, f"{param}: {message}", param=param, code="image_too_large")
