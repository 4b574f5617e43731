"""The shard format: Arrow IPC files with one record batch each, plus ``manifest.json``.

Columns: ``image`` (fixed-size binary, C*H*W uint8 bytes), ``label`` (int32, the class index),
``class_name`` and ``group`` (e.g. the Omniglot alphabet). A class's rows are contiguous and never
span two shards, so an episode gathers each class from one shard. One record batch per file because
random ``take`` on a multi-batch IPC file is ~40x slower.

The manifest records ``format`` and ``version``, the ``schema`` (column -> Arrow type), the
``image_shape`` ([C, H, W]), the ``classes`` (``name``, ``group``, ``shard``, ``first_row``,
``rows``), the named ``splits`` (lists of class indices), the ``shards`` (``file``, ``rows``,
``bytes``, ``sha256``), the builder's ``dataset`` and ``source``, and ``inverted`` (whether the stored
pixels are 255 minus those of the images as seen: the builder inverted each decoded pixel, or the
dataset's makers did, as Fashion-MNIST's negated photos; ``distmeta adapt`` inverts a user's images
alike; absent in manifests before distmeta 0.2, where only Omniglot's were); the sizes and SHA-256s
catch a truncated or corrupted shard before training starts.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import mmap
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

FORMAT = "distmeta-shards"
VERSION = 1
MANIFEST = "manifest.json"


class ShardError(ValueError):
    """Shards that cannot be used; the message names the file or class and the fix."""


def schema(image_bytes: int) -> pa.Schema:
    return pa.schema(
        [
            ("image", pa.binary(image_bytes)),
            ("label", pa.int32()),
            ("class_name", pa.string()),
            ("group", pa.string()),
        ]
    )


@dataclass
class ClassImages:
    name: str
    group: str
    images: np.ndarray  # [rows, C, H, W] uint8


def check_new_output(out: Path) -> None:
    """Refuse an output folder that already holds shards, before any work: rebuilding in place would
    destroy a dataset that runs may be reading (and whose fingerprint their checkpoints record)."""
    held = sorted(p.name for p in [out / MANIFEST, *out.glob("shard-*.arrow")] if p.exists())
    if held:
        raise ShardError(
            f"--out {out} already holds shards ({', '.join(held[:3])}{', ...' if len(held) > 3 else ''}): nothing is "
            f"overwritten; build into another folder, or remove {out} first"
        )


def write_shards(
    out: Path, classes: Iterable[ClassImages], splits: dict[str, list[int]], shard_bytes: int = 256 << 20, **info
) -> Path:
    """Write ``classes`` (an iterable: only a shard's worth is held at a time) as shards of about
    ``shard_bytes`` each, then the manifest; returns its path. Into a folder without shards alone
    (``check_new_output``); a build that fails leaves none of its shards behind."""
    check_new_output(out)
    out.mkdir(parents=True, exist_ok=True)
    shape, shards, entries, pending, written = None, [], [], [], []

    def flush() -> None:
        if not pending:
            return
        image_bytes = math.prod(shape)
        name = f"shard-{len(shards):05d}.arrow"
        images = np.concatenate([cls.images.reshape(len(cls.images), -1) for _, cls in pending])
        labels = np.concatenate([np.full(len(cls.images), index, np.int32) for index, cls in pending])
        batch = pa.record_batch(
            [
                pa.FixedSizeBinaryArray.from_buffers(
                    pa.binary(image_bytes),
                    len(images),
                    [None, pa.py_buffer(images)],  # no copy of the shard
                ),
                pa.array(labels, pa.int32()),
                pa.array([cls.name for _, cls in pending for _ in cls.images]),
                pa.array([cls.group for _, cls in pending for _ in cls.images]),
            ],
            schema=schema(image_bytes),
        )
        path = out / name
        written.append(path)
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, batch.schema) as writer:
            writer.write_batch(batch)
        shards.append({"file": name, "rows": len(images), "bytes": path.stat().st_size, "sha256": _sha256(path)})
        pending.clear()

    try:
        row = pending_bytes = 0
        for index, cls in enumerate(classes):
            shape = shape or tuple(cls.images.shape[1:])
            if cls.images.shape[1:] != shape or cls.images.dtype != np.uint8:
                raise ShardError(
                    f"class {cls.name}: images are {cls.images.dtype}{cls.images.shape[1:]}, expected uint8{shape}"
                )
            if pending_bytes and pending_bytes + cls.images.nbytes > shard_bytes:
                flush()
                row = pending_bytes = 0
            entries.append(
                {"name": cls.name, "group": cls.group, "shard": len(shards), "first_row": row, "rows": len(cls.images)}
            )
            pending.append((index, cls))
            pending_bytes += cls.images.nbytes
            row += len(cls.images)
        if shape is None:
            raise ShardError(f"no classes to write to {out}")
        flush()
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "schema": {field.name: str(field.type) for field in schema(math.prod(shape))},
            "image_shape": list(shape),
            "classes": entries,
            "splits": splits,
            "shards": shards,
            **info,
        }
        path, tmp = out / MANIFEST, out / f".{MANIFEST}.tmp"
        written.append(tmp)
        tmp.write_text(json.dumps(manifest, indent=1))
        os.replace(tmp, path)  # the manifest appears whole, after every shard it names
    except BaseException:  # Ctrl-C and a full disk included: no half-built dataset is left to pass for one
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return path


def read_manifest(root: str | Path) -> dict:
    """``root``'s manifest, once its structure is known to be sound: every key of the right type,
    every class inside its shard, every split member a class, shard files inside ``root``."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise ShardError(
            f"{path} does not exist: build shards with `distmeta data build omniglot --src ... --out {root}`"
        )
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ShardError(f"{path} is not valid JSON ({err}); rebuild the shards") from None
    if not isinstance(manifest, dict):
        raise ShardError(f"{path} holds a JSON {type(manifest).__name__}, not an object; rebuild the shards")
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ShardError(
            f"{path} is format {manifest.get('format')!r} version {manifest.get('version')!r}; this "
            f"distmeta reads {FORMAT!r} version {VERSION}: rebuild the shards with this version"
        )
    try:
        _check_manifest(manifest)
    except ShardError as err:
        raise ShardError(f"{path} is malformed: {err}; rebuild the shards (`distmeta data build ...`)") from None
    return manifest


def _check_manifest(manifest: dict) -> None:
    shape = _field(manifest, "image_shape", list, "")
    if len(shape) != 3 or not all(_is_int(n) and n > 0 for n in shape):
        raise ShardError(f"image_shape must be [channels, height, width] of positive integers, got {shape!r}")
    if math.prod(shape) >= 2**31:  # an Arrow fixed-size binary's width is an int32
        raise ShardError(f"image_shape {shape} is {math.prod(shape)} bytes an image, more than an Arrow row holds")
    if "inverted" in manifest:
        _field(manifest, "inverted", bool, "")
    shards = _field(manifest, "shards", list, "")
    for i, shard in enumerate(shards):
        where = f"shards[{i}]"
        name = _field(shard, "file", str, where)
        if not name or Path(name).name != name or name in (".", ".."):
            raise ShardError(f"{where}.file must be a file name in the shards' folder, got {name!r}")
        for key in ("rows", "bytes"):
            if _field(shard, key, int, where) < 0:
                raise ShardError(f"{where}.{key} must be >= 0")
        _field(shard, "sha256", str, where)
    classes = _field(manifest, "classes", list, "")
    for i, cls in enumerate(classes):
        where = f"classes[{i}]"
        _field(cls, "name", str, where)
        _field(cls, "group", str, where)
        shard, first, rows = (_field(cls, key, int, where) for key in ("shard", "first_row", "rows"))
        if not 0 <= shard < len(shards):
            raise ShardError(f"{where}.shard is {shard}, but there are {len(shards)} shards")
        if first < 0 or rows < 1 or first + rows > shards[shard]["rows"]:
            raise ShardError(
                f"{where} ({cls['name']}) holds rows {first}..{first + rows - 1} of shard {shard}, "
                f"which has {shards[shard]['rows']} rows"
            )
    splits = _field(manifest, "splits", dict, "")
    for name, members in splits.items():
        if not isinstance(members, list) or not all(_is_int(m) and 0 <= m < len(classes) for m in members):
            raise ShardError(f"splits[{name!r}] must be a list of class indices 0..{len(classes) - 1}")
        if len(set(members)) < len(members):  # one episode could draw it twice, under two labels
            raise ShardError(f"splits[{name!r}] lists a class more than once")
    for name, other in itertools.combinations(sorted(splits), 2):  # a scheme's splits share no class
        shared = set(splits[name]) & set(splits[other])
        if name.rpartition("/")[0] == other.rpartition("/")[0] and shared:
            raise ShardError(
                f"splits {name!r} and {other!r} share the class(es) {sorted(shared)[:5]}: "
                "what is trained on would be tested on"
            )


def _field(entry, key: str, kind: type, where: str):
    """``entry[key]``, of type ``kind``; ``where`` names ``entry`` in messages ("" for the manifest)."""
    if not isinstance(entry, dict):
        raise ShardError(f"{where} must be an object, got {entry!r:.80}")
    name = f"{where}.{key}" if where else key
    if key not in entry:
        raise ShardError(f"{name} is missing")
    value = entry[key]
    if not (_is_int(value) if kind is int else isinstance(value, kind)):
        raise ShardError(f"{name} must be {'an integer' if kind is int else kind.__name__}, got {value!r:.80}")
    return value


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def dataset_fingerprint(root: str | Path) -> str:
    """A SHA-256 over what defines the dataset: image shape, classes, splits and each shard's
    SHA-256 (not file names, nor where it was built from). Opening the shards checks the files
    against those SHA-256s, so equal fingerprints mean the same data wherever it lies."""
    manifest = read_manifest(root)
    content = {
        "image_shape": manifest["image_shape"],
        "classes": manifest["classes"],
        "splits": manifest["splits"],
        "shards": [(shard["rows"], shard["bytes"], shard["sha256"]) for shard in manifest["shards"]],
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


class ShardedDataset:
    """Shards opened for random access: ``gather(shard, rows)`` copies rows out.

    Shards totalling at most ``map_bytes`` are memory-mapped and gathered with one fancy index
    (the fastest path). Larger ones are read row by row with ``pread``: the pages a process maps
    count in its resident memory, and on current kernels a page-cache folio is mapped whole (up to
    2 MiB for one 12 KiB image), so random episodes from mapped multi-GB shards would grow the task
    generator's RSS towards the dataset's size. ``pread`` copies only the rows, from the page cache.
    """

    def __init__(self, root: str | Path, verify: bool = True, map_bytes: int = 256 << 20):
        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        self.image_shape = tuple(self.manifest["image_shape"])
        self.image_bytes = math.prod(self.image_shape)
        self.classes = self.manifest["classes"]
        self.splits = {name: np.asarray(members, dtype=np.int64) for name, members in self.manifest["splits"].items()}
        total = sum(shard["bytes"] for shard in self.manifest["shards"])
        self.mapped = total <= map_bytes or not hasattr(os, "preadv")
        self._images, self._files = [], []  # per shard: the mapped view; (fd, offset of row 0)
        for shard in self.manifest["shards"]:
            self._open(shard, verify)

    def _open(self, shard: dict, verify: bool) -> None:
        path = self.root / shard["file"]
        if not path.is_file():
            raise ShardError(f"shard {path} is missing; copy it back or rebuild the shards")
        if path.stat().st_size != shard["bytes"]:
            raise ShardError(
                f"shard {path} has {path.stat().st_size} bytes, the manifest says {shard['bytes']}: truncated?"
            )
        if verify and _verified_sha256(path) != shard["sha256"]:
            raise ShardError(f"shard {path} does not match its SHA-256 in the manifest: corrupted; rebuild it")
        try:
            with open(path, "rb") as f:
                mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            buffer = pa.py_buffer(mapped)
            table = pa.ipc.open_file(pa.BufferReader(buffer)).read_all()
        except (pa.ArrowInvalid, ValueError) as err:
            raise ShardError(f"shard {path} is not a readable Arrow IPC file ({err})") from None
        if (
            not table.schema.equals(schema(self.image_bytes))
            or table.num_rows != shard["rows"]
            or table.column("image").num_chunks != 1
        ):
            raise ShardError(f"shard {path}: schema, rows or batches differ from the manifest ({table.schema})")
        # chunk(0), not combine_chunks(): the latter copies the column into memory even for one chunk
        images = table.column("image").chunk(0).buffers()[1]
        if not buffer.address <= images.address <= buffer.address + buffer.size - images.size:
            # a compressed file's rows are decompressed elsewhere: no offset in the file to read them at
            raise ShardError(f"shard {path} is a compressed Arrow file; rebuild it with `distmeta data build ...`")
        self._files.append((None if self.mapped else os.open(path, os.O_RDONLY), images.address - buffer.address))
        data = np.frombuffer(images, dtype=np.uint8, count=table.num_rows * self.image_bytes)
        data.flags.writeable = False  # a view of the memory-mapped file
        self._images.append(data.reshape(table.num_rows, *self.image_shape))

    def gather(self, shard: int, rows: np.ndarray) -> np.ndarray:
        """A copy of the images at ``rows`` (any shape) of ``shard``: [*rows.shape, C, H, W] uint8."""
        if self.mapped:
            return self._images[shard][rows]
        if rows.size and not 0 <= rows.min() <= rows.max() < len(self._images[shard]):
            raise IndexError(f"rows {rows.min()}..{rows.max()} outside shard {shard}'s {len(self._images[shard])}")
        out = np.empty((*rows.shape, *self.image_shape), np.uint8)
        fd, start = self._files[shard]
        for row, image in zip(rows.ravel().tolist(), out.reshape(-1, self.image_bytes)):
            if os.preadv(fd, [image], start + row * self.image_bytes) != self.image_bytes:
                raise ShardError(f"shard {self.manifest['shards'][shard]['file']} ended early: truncated while in use?")
        return out

    def __del__(self) -> None:
        for fd, _ in getattr(self, "_files", ()):
            if fd is not None:
                os.close(fd)

    def images(self, shard: int) -> np.ndarray:
        """All of ``shard``'s images, a zero-copy view of the mapped file (for inspection: reading it
        maps the pages into this process)."""
        return self._images[shard]

    def split(self, name: str) -> np.ndarray:
        if name not in self.splits:
            raise ShardError(
                f"split {name!r} is not in {self.root / MANIFEST}; it has: {', '.join(self.splits)} (shards built by "
                "an older distmeta lack newer split schemes: rebuild them with `distmeta data build ...`)"
            )
        return self.splits[name]


_HASHED: dict[tuple[str, int, int], str] = {}  # (path, size, mtime) -> SHA-256, for this process


def _verified_sha256(path: Path) -> str:
    """The file's SHA-256, hashed once per process while its size and mtime stay the same: every
    evaluation chunk and generator builds a source, and hashing 2 GB of shards takes seconds."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _HASHED:
        _HASHED[key] = _sha256(path)
    return _HASHED[key]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
