"""Decode one image file into an RGB uint8 array at the working size — or say why it can't be used.

Pure of any data-set logic: `decode_image(path, ...)` returns a DecodedImage or raises
UnusableImage with a short reason that prepare puts in its quarantine report.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageFile, ImageOps

# Pillow's own bomb check raises for > 2x its limit and only warns below; decode_image checks
# explicitly against a cap every caller must give (prepare: params' data.max_image_pixels;
# serving and predict: the same value as the checkpoint recorded it) *before* decoding, so
# switch Pillow's off.
Image.MAX_IMAGE_PIXELS = None
ImageFile.LOAD_TRUNCATED_IMAGES = False

# The shipped params.yaml's data.max_image_pixels (a test keeps the two equal): the cap for
# checkpoints written before model.json recorded "max_image_pixels".
DEFAULT_MAX_IMAGE_PIXELS = 50_000_000
MIN_SIDE = 8  # smaller images carry no usable signal once resized to the working size
BACKGROUND = (255, 255, 255)  # transparent pixels are composited onto white, always the same


class UnusableImage(Exception):
    """The file cannot become a training image; the message is the quarantine reason."""


@dataclass
class DecodedImage:
    pixels: np.ndarray  # (S, S, 3) uint8
    width: int  # original size, after EXIF orientation
    height: int
    conversions: list[str] = field(default_factory=list)


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _to_rgb(image: Image.Image, conversions: list[str]) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # naive convert("RGB") clips 16-bit values to white; scale the real range to 0..255
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or array.max() > 255 else 255.0
        if mode == "F":
            low, high = float(array.min()), float(array.max())
            array, top = array - low, max(high - low, 1e-12)
        scaled = (array / top * 255.0).round().clip(0, 255).astype(np.uint8)
        conversions.append(f"{mode} scaled to 8-bit")
        return Image.fromarray(scaled, mode="L").convert("RGB")
    if mode == "P" and "transparency" in image.info or mode in ("RGBA", "LA", "PA", "RGBa"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        conversions.append(f"{mode} alpha composited on white")
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    conversions.append(f"{mode} converted to RGB")
    return image.convert("RGB")


def fit_to_square(image: Image.Image, size: int, conversions: list[str] | None = None) -> np.ndarray:
    """The one preprocessing training and serving share: an image (already EXIF-oriented) →
    (size, size, 3) uint8: to RGB (alpha on white, 16-bit scaled), centre-cropped to a square
    and resized with bicubic. Never squashes: a non-square image loses its edges, as in training.
    """
    rgb = _to_rgb(image, conversions if conversions is not None else [])
    fitted = ImageOps.fit(rgb, (size, size), Image.BICUBIC)
    return np.asarray(fitted, dtype=np.uint8).copy()


def decode_image(data: bytes, size: int, max_pixels: int) -> DecodedImage:
    """Full decode (truncation is only caught by decoding), EXIF orientation, RGB, resize+crop."""
    if not data:
        raise UnusableImage("empty file (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data))
    except Exception as exc:  # Pillow raises many types for non-images
        raise UnusableImage(f"not a readable image ({type(exc).__name__})") from None
    width, height = image.size
    if width * height > max_pixels:
        raise UnusableImage(
            f"{width}x{height} exceeds data.max_image_pixels={max_pixels} (decompression bomb?)"
        )
    if min(width, height) < MIN_SIDE:
        raise UnusableImage(f"{width}x{height} is smaller than {MIN_SIDE} px on a side")
    conversions: list[str] = []
    if getattr(image, "n_frames", 1) > 1:
        image.seek(0)
        conversions.append(f"first of {image.n_frames} frames")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image.load()
            oriented = ImageOps.exif_transpose(image)
    except Exception as exc:
        raise UnusableImage(f"corrupt or truncated image data ({exc})") from None
    if oriented is not image:
        orientation = image.getexif().get(0x0112)
        if orientation not in (None, 1):
            conversions.append(f"EXIF orientation {orientation} applied")
    return DecodedImage(
        pixels=fit_to_square(oriented, size, conversions),
        width=oriented.size[0],
        height=oriented.size[1],
        conversions=conversions,
    )
