"""Decoding and resizing images for ingest (Pillow, Lanczos antialiasing)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from distmeta.data.shards import ShardError


def load_image(name: str, data: bytes, size: int, mode: str) -> np.ndarray:
    """``data`` decoded, converted to ``mode`` ("L" or "RGB") and resized to size x size: [C, H, W] uint8."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as err:  # Pillow raises many types for a bad file
        raise ShardError(f"{name} is not an image Pillow can read ({err}); remove it from the dataset") from None
    array = np.asarray(image.convert(mode).resize((size, size), Image.Resampling.LANCZOS), dtype=np.uint8)
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
