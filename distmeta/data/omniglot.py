"""Omniglot (Lake et al., 2015) -> shards: 1,623 characters x 20 drawings, 105x105 -> 28x28.

Reads the official ``images_background.zip`` / ``images_evaluation.zip`` (or the folders they unpack
to; ``fetch_omniglot`` downloads and md5-checks them first), resizes with Lanczos antialiasing
(Pillow), inverts so strokes are bright on a dark background, as few-shot papers feed them, and
writes the ``maml``, ``vinyals`` and ``lake`` splits to the manifest (README, "Data: Arrow shards").
"""

from __future__ import annotations

import zipfile
from collections import defaultdict
from pathlib import Path

import numpy as np

from distmeta.config import ImageFormat
from distmeta.data.download import download
from distmeta.data.images import dataset_image
from distmeta.data.shards import MANIFEST, ClassImages, ShardError, read_manifest, write_shards
from distmeta.report import print_now

PARTS = ("images_background", "images_evaluation")
HOME_PAGE = "https://github.com/brendenlake/omniglot/tree/master/python"
OFFICIAL_URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python"
OFFICIAL_MD5 = {
    "images_background": "68d2efa1b9178cc56df9314c21c6e718",
    "images_evaluation": "6b91aef0f799c5bb55b94e3f2daec811",
}
SIZE = 28
FORMAT = ImageFormat(channels=1, height=SIZE, width=SIZE, invert=True)  # strokes bright on dark
SPLIT_SEED = 1
VINYALS_VAL_ALPHABETS = {"Armenian", "Bengali", "Early_Aramaic", "Hebrew", "Mkhedruli_(Georgian)"}
VINYALS_TEST_FROM = "Gurmukhi/character42"  # the first test character; evaluation characters from here on


def read_part(src: Path, part: str) -> dict[tuple[str, str], list[tuple[str, bytes]]]:
    """{(alphabet, character): [(file name, png bytes)]} from ``part``.zip or the folder ``part``."""
    characters: dict[tuple[str, str], list[tuple[str, bytes]]] = defaultdict(list)
    archive, folder = src / f"{part}.zip", src / part
    if archive.is_file():
        with zipfile.ZipFile(archive) as z:
            for name in z.namelist():
                pieces = name.split("/")
                if len(pieces) == 4 and pieces[0] == part and pieces[3]:
                    characters[(pieces[1], pieces[2])].append((name, z.read(name)))
    elif folder.is_dir():
        for path in folder.glob("*/*/*"):
            if path.is_file():
                characters[(path.parent.parent.name, path.parent.name)].append((str(path), path.read_bytes()))
    else:
        raise ShardError(
            f"neither {archive} nor {folder} exists: --src must hold the official Omniglot zips "
            f"({', '.join(p + '.zip' for p in PARTS)}) or the folders they unpack to"
        )
    if not characters:
        raise ShardError(f"{archive if archive.is_file() else folder} holds no alphabet/character/drawing files")
    return characters


def to_image(name: str, data: bytes) -> np.ndarray:
    return dataset_image(name, data, FORMAT)[0]


def build_omniglot(src: str | Path, out: str | Path, progress=print_now) -> Path:
    src, out = Path(src), Path(out)
    classes: list[ClassImages] = []
    part_of: list[str] = []
    for part in PARTS:
        characters = read_part(src, part)
        for (alphabet, character), files in sorted(characters.items()):
            images = np.stack([to_image(name, data) for name, data in sorted(files)])[:, None]
            classes.append(ClassImages(f"{alphabet}/{character}", alphabet, images))
            part_of.append(part)
        progress(f"{part}: {len(characters)} characters, {sum(len(f) for f in characters.values())} images")
    order = np.random.default_rng(SPLIT_SEED).permutation(len(classes)).tolist()
    vinyals = [_vinyals_split(c.name, part) for c, part in zip(classes, part_of)]
    splits = {
        "maml/train": sorted(order[:1100]),
        "maml/val": sorted(order[1100:1200]),
        "maml/test": sorted(order[1200:]),
        **{f"vinyals/{s}": [i for i, v in enumerate(vinyals) if v == s] for s in ("train", "val", "test")},
        "lake/train": [i for i, p in enumerate(part_of) if p == PARTS[0]],
        "lake/test": [i for i, p in enumerate(part_of) if p == PARTS[1]],
    }
    if len(classes) != 1623:
        progress(f"warning: {len(classes)} characters, the official Omniglot has 1,623; the split sizes assume it")
    path = write_shards(out, classes, splits, dataset="omniglot", source=str(src), inverted=FORMAT.invert)
    progress(f"wrote {len(classes)} classes to {out}")
    return path


def _vinyals_split(name: str, part: str) -> str:
    # Names sort as the split lists do: "character09" < "character42", and alphabets by name.
    if part == PARTS[1] and name >= VINYALS_TEST_FROM:
        return "test"
    return "val" if part == PARTS[0] and name.split("/")[0] in VINYALS_VAL_ALPHABETS else "train"


def fetch_omniglot(
    out: str | Path, url: str = OFFICIAL_URL, md5: dict[str, str] = OFFICIAL_MD5, progress=print_now
) -> Path:
    """Download the official zips into ``out/downloads`` (verified by md5), then build shards in
    ``out``. Run again, it downloads nothing twice, and shards ``out`` already holds are kept: a build
    never writes over a dataset (``check_new_output``)."""
    out = Path(out)
    fallback = (
        f"Build from a local copy instead: put {' and '.join(p + '.zip' for p in PARTS)} (from {HOME_PAGE}) "
        f"in a folder DIR and run `distmeta data build omniglot --src DIR --out {out}`"
    )
    for part in PARTS:
        download(f"{url}/{part}.zip", out / "downloads" / f"{part}.zip", md5[part], fallback, progress)
    if (out / MANIFEST).exists() and read_manifest(out).get("dataset") == "omniglot":
        progress(f"{out} already holds the Omniglot shards: kept (remove {out / MANIFEST} and the shards to rebuild)")
        return out / MANIFEST
    if not (out / MANIFEST).exists():  # the manifest comes last: these are a build killed mid-way (SIGKILL, OOM)
        orphans = sorted(out.glob("shard-*.arrow"))
        for shard in orphans:
            shard.unlink()
        if orphans:
            progress(f"removed {len(orphans)} shard(s) of an earlier build that did not finish (no {MANIFEST})")
    return build_omniglot(out / "downloads", out, progress)
