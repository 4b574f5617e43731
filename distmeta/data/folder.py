"""Any class-per-folder image dataset -> shards (mini-ImageNet, CIFAR-FS, tiered-ImageNet, your own).

``build_folder`` writes ``ROOT/<split>/<class>/<image>`` (or ``ROOT/<class>/<image>`` with a JSON
splits file) as shards with the splits ``default/train``, ``default/val`` and ``default/test``
(docs/data.md: what a build writes and refuses).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import numpy as np

from distmeta.config import ImageFormat
from distmeta.data.images import UnreadableImage, dataset_image, open_image, visible
from distmeta.data.shards import ClassImages, ShardError, check_new_output, write_shards
from distmeta.report import duration, print_now

SPLITS = ("train", "val", "test")
GRAY = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L")  # Pillow's grayscale modes
PROGRESS_EVERY_S = 10


def _class_folders(src: Path, splits_file: Path | None) -> list[tuple[str, Path]]:
    """(split, class folder) pairs, in a fixed order."""
    if splits_file is None:
        if not all((src / split).is_dir() for split in SPLITS):
            raise ShardError(
                f"{src} has no train/ val/ test/ folders; either lay the classes out as ROOT/<split>/<class>/ "
                'or pass --splits FILE (JSON: {"train": [classes], "val": [...], "test": [...]})'
            )
        pairs = [(split, d) for split in SPLITS for d in sorted(visible((src / split).iterdir(), src)) if d.is_dir()]
        _check_disjoint(pairs)
        return pairs
    try:
        assignment = json.loads(Path(splits_file).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
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
            if not (src / name).resolve().is_relative_to(src.resolve()):
                raise ShardError(f"split file {splits_file} lists class {name!r}, which is outside --src {src}")
            pairs.append((split, src / name))
    return pairs


def _check_disjoint(pairs: list[tuple[str, Path]]) -> None:
    """Meta-testing is on classes never trained on: ROOT/<split>/<class>/ splits by class, so one
    class (by name, whatever its case, or by the folder a link leads to) must not be in two splits."""
    splits_of: dict[str, set[str]] = {}
    for split, folder in pairs:
        splits_of.setdefault(folder.name.casefold(), set()).add(split)
        splits_of.setdefault(str(folder.resolve()), set()).add(split)
    shared = sorted(name for name, splits in splits_of.items() if len(splits) > 1)
    if shared:
        raise ShardError(
            f"class(es) {', '.join(shared[:5])} are in more than one of train/ val/ test/: a class's images would be "
            "trained on and tested on. This layout splits by class (each class in one split); a dataset split by "
            "image (ImageNet's train/ and val/) is one pool of classes: put them in ROOT/<class>/ and pass --splits"
        )


def _mode(path: Path) -> str:
    """The image's mode, from its header alone; a file that is no image stops the build, named."""
    try:
        with open_image(str(path), path) as image:
            palette = image.getpalette() if image.mode == "P" else None
            if palette and palette[0::3] == palette[1::3] == palette[2::3]:  # a GIF of grays is grayscale
                return "L"
            return image.mode
    except UnreadableImage as err:
        raise ShardError(f"{err}; remove it from the dataset") from None


def build_folder(
    src: str | Path,
    out: str | Path,
    image_size: int,
    splits_file: str | Path | None = None,
    channels: int | None = None,
    invert: bool = False,
    progress=print_now,
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
    for _, folder in pairs:
        try:
            folder.name.encode("utf-8")
        except UnicodeEncodeError:  # the shards store class names as UTF-8 text
            raise ShardError(f"class folder {folder!s:.200} has a name that is not UTF-8 text: rename it") from None
    files = {}
    for _, folder in pairs:
        entries = visible(folder.iterdir(), folder)
        inner = sorted(p.name for p in entries if p.is_dir())
        if inner:  # its images would be left out unseen
            raise ShardError(
                f"class folder {folder} holds folder(s) {', '.join(inner[:3])}: a class's images sit directly in its "
                "folder; move them up, or make each folder a class of its own"
            )
        odd = sorted(p.name for p in entries if not p.is_file() and not p.is_dir())
        if odd:  # a link to nothing, a pipe: an image the user meant to be there is not
            raise ShardError(f"class folder {folder} holds {', '.join(odd[:3])}, which are not files (a broken link?)")
        files[folder] = sorted(p for p in entries if p.is_file())
        if not files[folder]:
            raise ShardError(f"class folder {folder} holds no images; remove it or add images")
    why = ""
    if channels is None:  # grayscale only if every image is
        colour = next((p for members in files.values() for p in members if _mode(p) not in GRAY), None)
        channels, why = (3, f" ({colour} is in colour; --channels 1 stores all as grayscale)") if colour else (1, "")
    fmt = ImageFormat(channels=channels, height=image_size, width=image_size, invert=invert)
    splits = {f"default/{split}": [i for i, (s, _) in enumerate(pairs) if s == split] for split in SPLITS}

    total = sum(len(members) for members in files.values())
    progress(f"{len(pairs)} classes, {total} images, {channels} channel(s){why}")

    def classes():  # decoded a class at a time, as the shards are written: memory for a shard, not the dataset
        started = last = time.time()
        done = 0
        for split, folder in pairs:
            images = np.stack([dataset_image(str(p), p.read_bytes(), fmt) for p in files[folder]])
            # with a splits file, the class's path under --src: a/cat and b/cat are two classes, not one name twice
            name = f"{split}/{folder.name}" if splits_file is None else folder.relative_to(src).as_posix()
            yield ClassImages(name, split, images)
            done += len(images)
            if time.time() - last >= PROGRESS_EVERY_S and done < total:
                last, rate = time.time(), done / (time.time() - started)
                progress(f"decoded {done}/{total} images | {rate:.0f} images/s | ETA {duration((total - done) / rate)}")

    path = write_shards(out, classes(), splits, dataset="folder", source=str(src), inverted=fmt.invert)
    progress(f"wrote {out}")
    return path
