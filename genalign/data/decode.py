"""Decoding any stored image the way a viewer shows it (EXIF orientation, conversion by bit depth).

Source: Pillow (``Image.open``, ``ImageOps.exif_transpose``, mode conversion).
"""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image, ImageOps


def decode_image(data) -> Image.Image:
    """Any stored image → an 8-bit RGB PIL image, the way a viewer shows it.

    ``data``: PIL image, encoded bytes, ``{"bytes": ...}`` (datasets' Image feature), or a path. EXIF orientation is
    applied (a rotated phone JPEG comes out upright). Modes are converted by bit depth, not clipped: 16-bit grey
    (``I;16*``) and 32-bit integer (``I``, how Pillow opens 16-bit PNGs) are scaled by 255/65535, float (``F``)
    by 255 when its values lie in [0, 1]; palette, CMYK, LA/RGBA (alpha dropped) go through Pillow's ``convert``.
    (16-bit RGB PNGs are opened by Pillow as 8-bit RGB from their high bytes, which is already correct.)

    Raises:
        OSError / ValueError / TypeError: undecodable data (callers count and skip the row).
    """
    if isinstance(data, dict) and "bytes" in data:
        data = data["bytes"] if data["bytes"] is not None else data.get("path")
    if isinstance(data, Image.Image):
        img = data
    elif isinstance(data, (bytes, bytearray, memoryview)):
        img = Image.open(io.BytesIO(bytes(data)))
    elif isinstance(data, (str, os.PathLike)):
        img = Image.open(data)
    else:
        raise TypeError(f"not an image: {type(data).__name__}")
    img.load()
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # Why: convert("RGB") clips integer modes at 255, so mid-grey 32768 would become white.
        a = np.asarray(img).astype(np.float64)
        scale = 255.0 / 65535.0 if img.mode.startswith("I;16") or a.max(initial=0) > 255 else 1.0
        img = Image.fromarray(np.clip(np.rint(a * scale), 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        a = np.asarray(img).astype(np.float64)
        scale = 255.0 if a.size and a.min() >= 0 and a.max() <= 1 else 1.0
        img = Image.fromarray(np.clip(np.rint(a * scale), 0, 255).astype(np.uint8), "L")
    elif img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")
