"""Image files -> model inputs: decode (Pillow), convert, resize (Lanczos antialiasing), invert.

Shard builders store what ``prepare`` makes, uint8 [C, H, W]; the worker scales it to [0, 1]
(``tasks.batch``). ``distmeta adapt`` prepares a user's images with the same function and the
``ImageFormat`` the checkpoint recorded, so they reach the model as the training images did.
"""

from __future__ import annotations

import functools
import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from distmeta.config import ImageFormat
from distmeta.data.shards import ShardError

# The raster formats read. Pillow would also open PostScript (EPS), which it hands to Ghostscript, an
# interpreter: a data file must never run as a program, whatever its name says.
IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "PPM")  # JPEG includes MPO (cameras)


@functools.cache  # asked once per folder of a support set: Pillow's registry does not change
def image_suffixes() -> frozenset[str]:
    """The file-name endings Pillow gives ``IMAGE_FORMATS`` (.png, .jpg, .jpeg, .tif, ...): a file so
    named that does not decode is a damaged image, not a stray file to skip."""
    Image.init()
    named = (*IMAGE_FORMATS, "MPO")  # Pillow files .mpo (a camera's JPEG) under MPO, which JPEG's reader opens
    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in named)


class UnreadableImage(ValueError):
    """A file Pillow cannot decode; the message names it."""


def open_image(name: str, source) -> Image.Image:
    """``source`` (a path or a file object) opened lazily as one of ``IMAGE_FORMATS``, or an
    ``UnreadableImage`` naming ``name`` and why."""
    try:
        return Image.open(source, formats=IMAGE_FORMATS)
    except Exception as err:  # Pillow raises many types for a bad file
        raise UnreadableImage(
            f"{name} is not an image in a format distmeta reads ({', '.join(IMAGE_FORMATS)}): {err}"
        ) from None


def decode(name: str, data: bytes) -> Image.Image:
    image = open_image(name, io.BytesIO(data))
    try:
        image.load()
    except Exception as err:
        raise UnreadableImage(f"{name} is not an image distmeta can read ({err})") from None
    return image


def prepare(image: Image.Image, fmt: ImageFormat) -> np.ndarray:
    """``image`` as ``fmt`` says: uint8 [channels, height, width]. Turned upright as its EXIF
    orientation says (a phone's portrait photo), transparent parts on white (a drawing app's strokes
    on a transparent PNG would otherwise turn into a black square)."""
    image = ImageOps.exif_transpose(image)
    if image.mode == "F":  # floats: [0, 1] or [0, 255] or anything; guessing would store the wrong images
        raise ValueError("its pixels are 32-bit floats, whose range says nothing: save it as 8-bit PNG")
    if image.mode.startswith("I"):  # 16-bit grayscale (I;16, or I from older Pillows): convert would clip at 255
        wide = np.asarray(image, dtype=np.float64) / 257  # 65535 -> 255
        image = Image.fromarray(np.clip(np.rint(wide), 0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA", "RGBa") or "transparency" in image.info:  # an alpha, or a keyed colour
        image = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image.convert("RGBA"))
    mode = "L" if fmt.channels == 1 else "RGB"
    resized = image.convert(mode).resize((fmt.width, fmt.height), Image.Resampling.LANCZOS)
    array = np.asarray(resized, dtype=np.uint8)
    array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    return 255 - array if fmt.invert else array


def visible(paths, root: Path) -> list[Path]:
    """``paths`` but those hidden below ``root`` (a dot file, or inside a dot folder: .DS_Store,
    .ipynb_checkpoints): what a dataset folder or a support set holds besides its images."""
    return [p for p in paths if not any(part.startswith(".") for part in p.relative_to(root).parts)]


def dataset_image(name: str, data: bytes, fmt: ImageFormat) -> np.ndarray:
    """A dataset's image file as a shard stores it; a file that does not decode stops the build."""
    try:
        return prepare(decode(name, data), fmt)
    except UnreadableImage as err:
        raise ShardError(f"{err}; convert it or remove it from the dataset") from None
    except (ValueError, OSError) as err:  # a mode Pillow cannot convert (LAB, ...)
        raise ShardError(f"{name} cannot be converted to {fmt.channels} channel(s) ({err}); convert it") from None
