"""The files of ``distmeta adapt``: the support folder (one folder per class), the query images, and
the output folder (predictions as CSV, the adapted network, a JSON record of what was adapted).

A file named as an image that does not decode is refused, not skipped, so that no class silently
loses an example; other files (Thumbs.db, notes) are left out and named. Nothing is overwritten.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from distmeta.adaptation import AdaptError, Prediction, Predictor
from distmeta.checkpoint import probe_write
from distmeta.data.images import IMAGE_FORMATS, UnreadableImage, image_suffixes, open_image, visible

PREDICTIONS, MODEL, RECORD = "predictions.csv", "adapted.pt", "adapted.json"


def _why_not_an_image(path: Path) -> str | None:
    """None if ``path`` is an image in a format we read (its header alone is read), else why not."""
    try:
        with open_image(str(path), path):
            return None
    except UnreadableImage as err:
        return str(err)


def _images_under(folder: Path) -> list[Path]:
    """The image files anywhere under ``folder``, sorted. Hidden files, and files that are not images
    (Thumbs.db, notes.txt), are left out, the latter named on stderr; a file named as an image
    (x.jpg) that does not decode is refused, so that no class silently loses an example."""
    files = sorted(p for p in visible(folder.rglob("*"), folder) if p.is_file())
    why_not = {p: why for p in files if (why := _why_not_an_image(p)) is not None}
    damaged = [p for p in why_not if p.suffix.lower() in image_suffixes()]
    if damaged:
        first, *rest = damaged
        more = f" (and {len(rest)} more named as images that do not decode: {_first_names(rest, folder)})"
        raise AdaptError(f"{why_not[first]}; replace or remove it{more if rest else ''}")
    if why_not:
        names = _first_names(list(why_not), folder)
        print(f"note: {len(why_not)} file(s) in {folder} are not images and are left out: {names}", file=sys.stderr)
    return [p for p in files if p not in why_not]


def _first_names(paths: list[Path], folder: Path, shown: int = 3) -> str:
    """The first ``shown`` of ``paths``, relative to ``folder``, and "..." if there are more."""
    return ", ".join(str(p.relative_to(folder)) for p in paths[:shown]) + (", ..." if len(paths) > shown else "")


def class_folders(root: str | Path) -> dict[str, list[Path]]:
    """{class: its image files} for ``root/<class>/<image>`` (searched whole); hidden files and
    files that are not images are skipped."""
    root = Path(root)
    if not root.is_dir():
        raise AdaptError(f"--support {root} is not a folder: give one folder per class, SUPPORT/<class>/<images>")
    loose = [p.name for p in visible(root.iterdir(), root) if p.is_file()]
    if loose:
        raise AdaptError(
            f"--support {root} holds files outside class folders ({', '.join(sorted(loose)[:3])}): put each image "
            "in the folder of its class, SUPPORT/<class>/<image>"
        )
    folders = [d for d in visible(root.iterdir(), root) if d.is_dir()]
    classes = {d.name: _images_under(d) for d in folders}
    empty = sorted(name for name, files in classes.items() if not files)
    if empty:
        raise AdaptError(f"class folder(s) {', '.join(empty)} in {root} hold no images: each class needs at least one")
    if not classes:
        raise AdaptError(f"--support {root} holds no class folders: SUPPORT/<class>/<images>")
    return dict(sorted(classes.items()))


def image_files(paths: Sequence[str | Path]) -> list[Path]:
    """The files named, and every image under the folders named (sorted; hidden files and files that
    are not images skipped). A file named that is not an image is refused now, before any work."""
    if not paths:
        raise AdaptError("--query names no image files or folders: give at least one")
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            found = _images_under(path)
            if not found:
                raise AdaptError(f"--query folder {path} holds no images")
            files += found
        elif path.is_file():
            if _why_not_an_image(path) is not None:
                raise AdaptError(
                    f"--query {path} is not an image in a format distmeta reads ({', '.join(IMAGE_FORMATS)})"
                )
            files.append(path)
        else:
            raise AdaptError(f"--query {path} does not exist")
    return files


def check_out(out: Path) -> None:
    """Refuse, before any work, an output folder that holds an earlier adaptation's files (nothing
    is overwritten) or that cannot be written (probed in its nearest existing folder: no folder is
    created to find out)."""
    taken = [name for name in (PREDICTIONS, MODEL, RECORD) if (out / name).exists()]
    if taken:
        raise AdaptError(f"--out {out} already holds {', '.join(taken)} from an earlier run: choose another --out")
    existing = next(p for p in (out, *out.absolute().parents) if p.exists())
    try:
        if not existing.is_dir():
            raise NotADirectoryError(f"{existing} is a file")
        probe_write(existing)
    except OSError as err:
        raise AdaptError(f"--out {out} cannot be written ({err}): choose another --out") from None


def write_predictions(stream, queries: list[Path], predictions: list[Prediction]) -> None:
    """The predictions as CSV rows (quoted: a class or file name may hold a comma), as printed and as saved."""
    rows = csv.writer(stream)
    rows.writerow(["query", "predicted", "probability"])
    rows.writerows([str(path), p.label, f"{p.probability:.6f}"] for path, p in zip(queries, predictions))


def write_adapted(
    out: Path, predictor: Predictor, checkpoint: str | Path, queries: list[Path], predictions: list[Prediction]
) -> list[Path]:
    """Write the predictions (CSV), the adapted network's state dict (MAML family, the baseline) and a JSON record of
    what was adapted; returns the files written."""
    check_out(out)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / PREDICTIONS]
    with open(out / PREDICTIONS, "w", newline="") as f:
        write_predictions(f, queries, predictions)
    if predictor.adaptive:
        torch.save(predictor.state_dict(), out / MODEL)
        written.append(out / MODEL)
    cfg = predictor.cfg
    record = {
        "checkpoint": str(checkpoint),
        "algorithm": cfg.algorithm.name,
        "steps": predictor.steps,
        "classes": predictor.classes,
        "image_format": dataclasses.asdict(predictor.image_format),
        "model": dataclasses.asdict(cfg.model) | {"output_dim": len(predictor.classes)},
        "state_dict": MODEL if predictor.adaptive else None,
    }
    (out / RECORD).write_text(json.dumps(record, indent=1))
    written.append(out / RECORD)
    return written
