"""Fashion-MNIST (Xiao et al., 2017) -> shards: 10 classes of clothing, 28x28 grayscale, for testing
how a model meta-trained on Omniglot transfers to another domain (5-way episodes).

Reads the four IDX files as Debian's ``dataset-fashion-mnist`` installs them
(``/usr/share/datasets/fashion-mnist``, gzipped) or as the dataset's home page serves them.
Pixels are stored as the files hold them: bright garments on a dark background, as Omniglot's
strokes after its inversion, because the dataset's makers negated their product photos; so the
manifest says ``inverted``, and ``distmeta adapt`` inverts a photo of a garment on a light
background to match. Each class appears twice, once per official split:
``train/<class>`` (6,000 images each) in ``default/train`` and ``test/<class>`` (1,000 each) in
``default/test``; there is no validation split (10 classes are too few to hold some out).
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from distmeta.data import FASHION_MNIST_DEBIAN
from distmeta.data.shards import ClassImages, ShardError, write_shards
from distmeta.report import print_now

CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
PARTS = {"train": "train", "test": "t10k"}  # split -> file prefix
IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049
SIZE = 28


def read_idx(path: Path, magic: int) -> np.ndarray:
    """An IDX file (gzipped or not) as a uint8 array: [n, 28, 28] images or [n] labels."""
    try:
        raw = path.read_bytes()
        data = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise ShardError(f"cannot read {path}: {err}") from None
    dims = 3 if magic == IMAGES_MAGIC else 1
    header = 4 * (1 + dims)
    if len(data) < header or int.from_bytes(data[:4], "big") != magic:
        raise ShardError(f"{path} is not an IDX file of {'images' if dims == 3 else 'labels'} (magic {magic})")
    shape = [int.from_bytes(data[4 * (1 + i) : 4 * (2 + i)], "big") for i in range(dims)]
    if dims == 3 and shape[1:] != [SIZE, SIZE]:
        raise ShardError(f"{path} holds {shape[1]}x{shape[2]} images; Fashion-MNIST's are {SIZE}x{SIZE}")
    if len(data) != header + int(np.prod(shape)):
        raise ShardError(f"{path} holds {len(data) - header} bytes of data for a shape {shape}: truncated?")
    return np.frombuffer(data, np.uint8, offset=header).reshape(shape)


def _find(src: Path, name: str) -> Path:
    for candidate in (src / f"{name}.gz", src / name):
        if candidate.is_file():
            return candidate
    raise ShardError(
        f"{src} has no {name}(.gz): install Debian's copy (apt-get install dataset-fashion-mnist, into "
        f"{FASHION_MNIST_DEBIAN}) or pass --src FOLDER holding the four IDX files"
    )


def build_fashion_mnist(
    src: str | Path = FASHION_MNIST_DEBIAN, out: str | Path = "data/fashion_mnist", progress=print_now
) -> Path:
    src, out = Path(src), Path(out)
    classes: list[ClassImages] = []
    splits: dict[str, list[int]] = {"default/train": [], "default/test": []}
    for split, prefix in PARTS.items():
        images = read_idx(_find(src, f"{prefix}-images-idx3-ubyte"), IMAGES_MAGIC)
        labels = read_idx(_find(src, f"{prefix}-labels-idx1-ubyte"), LABELS_MAGIC)
        if len(images) != len(labels) or labels.max(initial=0) >= len(CLASSES):
            raise ShardError(
                f"{src}: the {split} images and labels do not match ({len(images)} images, labels up to "
                f"{labels.max(initial=0)}); reinstall the dataset"
            )
        for label, name in enumerate(CLASSES):
            members = images[labels == label][:, None]  # [n, 1, 28, 28], in the files' order
            splits[f"default/{split}"].append(len(classes))
            classes.append(ClassImages(f"{split}/{name}", split, np.ascontiguousarray(members)))
        progress(f"{split}: {len(images)} images of {len(CLASSES)} classes")
    path = write_shards(out, classes, splits, dataset="fashion-mnist", source=str(src), inverted=True)
    progress(f"wrote {len(classes)} classes to {out}")
    return path
