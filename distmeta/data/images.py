"""Image files -> model inputs: decode (Pillow), convert, resize (Lanczos antialiasing), invert.

Shard builders store what ``prepare`` makes, uint8 [C, H, W]; the worker scales it to [0, 1]
(``tasks.batch``). ``distmeta adapt`` prepares a user's images with the same function and the
``ImageFormat`` the checkpoint recorded, so they reach the model as the training images did.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from distmeta.config import ImageFormat
from distmeta.data.shards import ShardError


class UnreadableImage(ValueError):
    """A file Pillow cannot decode; the message names it."""


def decode(name: str, data: bytes) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as err:  # Pillow raises many types for a bad file
        raise UnreadableImage(f"{name} is not an image Pillow can read ({err})") from None
    return image


def prepare(image: Image.Image, fmt: ImageFormat) -> np.ndarray:
    """``image`` as ``fmt`` says: uint8 [channels, height, width]."""
    mode = "L" if fmt.channels == 1 else "RGB"
    resized = image.convert(mode).resize((fmt.width, fmt.height), Image.Resampling.LANCZOS)
    array = np.asarray(resized, dtype=np.uint8)
    array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    return 255 - array if fmt.invert else array


def dataset_image(name: str, data: bytes, fmt: ImageFormat) -> np.ndarray:
    """A dataset's image file as a shard stores it; a file that does not decode stops the build."""
    try:
        return prepare(decode(name, data), fmt)
    except UnreadableImage as err:
        raise ShardError(f"{err}; remove it from the dataset") from None
