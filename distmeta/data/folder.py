"""Any class-per-folder image dataset -> shards (mini-ImageNet, CIFAR-FS, tiered-ImageNet, your own).

``build_folder`` writes ``ROOT/<split>/<class>/<image>`` (or ``ROOT/<class>/<image>`` with a JSON
splits file) as shards with the splits ``default/train``, ``default/val`` and ``default/test``
(README, "Data: Arrow shards").
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from distmeta.config import ImageFormat
from distmeta.data.images import dataset_image, visible
from distmeta.data.shards import ClassImages, ShardError, check_new_output, write_shards
from distmeta.report import duration

SPLITS = ("train", "val", "test")
PROGRESS_EVERY_S = 10


def _class_folders(src: Path, splits_file: Path | None) -> list[tuple[str, Path]]:
    """(split, class folder) pairs, in a fixed order."""
    if splits_file is None:
        if not all((src / split).is_dir() for split in SPLITS):
            raise ShardError(
                f"{src} has no train/ val/ test/ folders; either lay the classes out as ROOT/<split>/<class>/ "
                'or pass --splits FILE (JSON: {"train": [classes], "val": [...], "test": [...]})'
            )
        return [(split, d) for split in SPLITS for d in sorted(visible((src / split).iterdir(), src)) if d.is_dir()]
    try:
        assignment = json.loads(Path(splits_file).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ShardError(f"split file {splits_file} cannot be read as JSON ({err})") from None
    if not isinstance(assignment, dict) or not all(
        isinstance(names, list) and all(isinstance(n, str) for n in names) for names in assignment.values()
    ):
        raise ShardError(
            f'split file {splits_file} must be a JSON object of class-name lists: {{"train": [classes], "val": [...], '
            '"test": [...]}'
        )
    unknown = set(assignment) - set(SPLITS)
    if unknown:
        raise ShardError(f"split file {splits_file} names splits {sorted(unknown)}; use {', '.join(SPLITS)}")
    # by the folder named, not the text: "cat", "cat/" and "./cat" are one class
    named = Counter((src / n).resolve() for names in assignment.values() for n in names)
    twice = sorted(folder.name for folder, n in named.items() if n > 1)
    if twice:  # its images would be trained on and tested on
        raise ShardError(f"split file {splits_file} lists the class(es) {', '.join(twice[:5])} more than once")
    pairs = []
    for split in SPLITS:
        for name in assignment.get(split, []):
            if not (src / name).is_dir():
                raise ShardError(f"split file {splits_file} lists class {name!r}, but {src / name} is not a folder")
            pairs.append((split, src / name))
    return pairs


def _mode(path: Path) -> str:
    """The image's mode, from its header alone; a file that is no image stops the build, named."""
    try:
        with Image.open(path) as image:
            return image.mode
    except Exception as err:  # Pillow raises many types for a bad file
        raise ShardError(f"{path} is not an image Pillow can read ({err}); remove it from the dataset") from None


def build_folder(
    src: str | Path,
    out: str | Path,
    image_size: int,
    splits_file: str | Path | None = None,
    channels: int | None = None,
    invert: bool = False,
    progress=print,
) -> Path:
    """``invert``: store each pixel as 255 minus it, as Omniglot's builder does (dark strokes on light
    become bright on dark): for drawings to score with, or train beside, an Omniglot model."""
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise ShardError(f"--src {src} is not a folder")
    if image_size < 1:
        raise ShardError(f"--image-size {image_size}: give the side of the stored square images in pixels, 1 or more")
    check_new_output(out)
    pairs = _class_folders(src, Path(splits_file) if splits_file else None)
    if not pairs:
        raise ShardError(f"no class folders found under {src}")
    files = {}
    for _, folder in pairs:
        entries = visible(folder.iterdir(), folder)
        inner = sorted(p.name for p in entries if p.is_dir())
        if inner:  # its images would be left out unseen
            raise ShardError(
                f"class folder {folder} holds folder(s) {', '.join(inner[:3])}: a class's images sit directly in its "
                "folder; move them up, or make each folder a class of its own"
            )
        files[folder] = sorted(p for p in entries if p.is_file())
        if not files[folder]:
            raise ShardError(f"class folder {folder} holds no images; remove it or add images")
    if channels is None:  # grayscale only if every image is
        grayscale = all(_mode(p) in ("1", "L", "LA", "I", "I;16") for members in files.values() for p in members)
        channels = 1 if grayscale else 3
    fmt = ImageFormat(channels=channels, height=image_size, width=image_size, invert=invert)
    splits = {f"default/{split}": [i for i, (s, _) in enumerate(pairs) if s == split] for split in SPLITS}

    total = sum(len(members) for members in files.values())
    progress(f"{len(pairs)} classes, {total} images, {channels} channel(s)")

    def classes():  # decoded a class at a time, as the shards are written: memory for a shard, not the dataset
        started = last = time.time()
        done = 0
        for split, folder in pairs:
            images = np.stack([dataset_image(str(p), p.read_bytes(), fmt) for p in files[folder]])
            yield ClassImages(f"{split}/{folder.name}" if splits_file is None else folder.name, split, images)
            done += len(images)
            if time.time() - last >= PROGRESS_EVERY_S and done < total:
                last, rate = time.time(), done / (time.time() - started)
                progress(f"decoded {done}/{total} images | {rate:.0f} images/s | ETA {duration((total - done) / rate)}")

    path = write_shards(out, classes(), splits, dataset="folder", source=str(src), inverted=fmt.invert)
    progress(f"wrote {out}")
    return path
