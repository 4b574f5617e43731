"""N-way K-shot episodes from Arrow shards (see distmeta/data/shards.py).

A batch of episodes is a few vectorised random draws and one gather per shard, so only the
episodes' bytes are copied; ``task.rotations`` adds each training class rotated by 90, 180 and 270
degrees as three new classes (Santoro et al., 2016; Finn et al., 2017).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from distmeta.config import ConfigError, ImageFormat
from distmeta.data.shards import MANIFEST, ShardedDataset, ShardError, dataset_fingerprint
from distmeta.models import DataSpec
from distmeta.tasks.batch import TaskBatch

ROTATIONS = 4


def distinct_choices(rng: np.random.Generator, rows: int, k: int, n: int) -> np.ndarray:
    """[rows, k] integers in [0, n), distinct within each row, each row a uniform random k-subset in
    random order. Draws with replacement and redraws the rows with a repeat: for k << n this is much
    cheaper than ranking n random keys per row. A row has no repeat with chance about exp(-k^2 / 2n),
    so past k^2 = 4n (one row in 7.4) the redraws could run for ever: rank instead."""
    if k > n // 4 or k * k > 4 * n:  # repeats are common: rank random keys instead
        return np.argsort(rng.random((rows, n)), axis=1)[:, :k]
    picks = rng.integers(0, n, (rows, k))
    while True:
        ordered = np.sort(picks, axis=1)
        repeated = (ordered[:, 1:] == ordered[:, :-1]).any(axis=1)
        if not repeated.any():
            return picks
        picks[repeated] = rng.integers(0, n, (int(repeated.sum()), k))


class ShardEpisodes:
    kind = "classification"
    fingerprinted = True  # a run records its shards' fingerprint, and finds them by it (check_same_data)

    def __init__(
        self,
        root: str,
        scheme: str,
        ways: int,
        rotations: bool,
        verify: bool = True,
        map_shards_mb: int = 256,
        class_labels: bool = False,
        train_with_val: bool = False,
    ):
        """``class_labels``: training episodes are labelled with the training split's class index
        (``task.labels=class``), and the model's output is one score per training class.
        ``train_with_val``: the validation classes join the training split's (which then holds
        them after its own), and there is no validation split."""
        self.data = ShardedDataset(root, verify=verify, map_bytes=map_shards_mb << 20)
        self.scheme, self.ways, self.rotations, self.class_labels = scheme, ways, rotations, class_labels
        if train_with_val and f"{scheme}/val" not in self.data.splits:
            raise ConfigError(
                f"task.train_with_val=true, but the shards at {root} have no {scheme}/val split to train on; "
                "choose a task.split_scheme with one or leave task.train_with_val=false"
            )
        self.train_with_val = train_with_val
        classes = self.data.classes
        self.shard = np.array([c["shard"] for c in classes])
        self.first_row = np.array([c["first_row"] for c in classes])
        self.rows = np.array([c["rows"] for c in classes])
        held = ("train", "test") if train_with_val else ("train", "val", "test")
        self.splits = tuple(s for s in held if f"{scheme}/{s}" in self.data.splits)
        # resolved once: sample() asks for its split's pool every batch
        self.pools = {s: self.data.split(f"{scheme}/{s}") for s in self.splits}
        if train_with_val:
            self.pools["train"] = np.concatenate([self.data.split(f"{scheme}/{s}") for s in ("train", "val")])
        if not self.splits:
            self.pool("train")  # raises, naming the split the manifest lacks
        # episode labels need no training split: held-out episodes of another dataset (evaluate --shards)
        outputs = len(self.pool("train")) * (ROTATIONS if rotations else 1) if class_labels else ways
        self.spec = DataSpec(input_shape=self.data.image_shape, output_dim=outputs)
        _, height, width = self.data.image_shape
        if rotations and height != width:
            raise ConfigError(
                f"task.rotations=true turns training images by 90 degrees, but the shards at {root} hold "
                f"{height}x{width} images: set task.rotations=false"
            )

    @property
    def image_format(self) -> ImageFormat:
        """How the builder made the images from their files (``ImageFormat``)."""
        channels, height, width = self.data.image_shape
        manifest = self.data.manifest
        inverted = manifest.get("inverted", manifest.get("dataset") == "omniglot")  # before 0.2: Omniglot's only
        return ImageFormat(channels=channels, height=height, width=width, invert=inverted)

    def pool(self, split: str) -> np.ndarray:
        """The class indices of ``split`` under this scheme."""
        if split in self.pools:
            return self.pools[split]
        if split == "val" and self.train_with_val:  # its classes are training classes now
            raise ConfigError("task.train_with_val=true trains on the validation classes: there is no validation split")
        return self.data.split(f"{self.scheme}/{split}")  # not in the manifest: raises, naming it

    @classmethod
    def check_options(cls, cfg) -> None:
        """Before any file is read: the task options name a shard folder."""
        if not cfg.shards:
            raise ConfigError("task.source=shards needs task.shards=DIR, a folder written by `distmeta data build`")

    @classmethod
    def data_fingerprint(cls, cfg) -> str:
        """The fingerprint of the shards the task options name (``dataset_fingerprint``)."""
        return dataset_fingerprint(cfg.shards)

    @classmethod
    def check_same_data(cls, saved, cfg) -> None:
        """The shards the task options ``cfg`` name hold the data of the run whose options were
        ``saved``: at the stored path, or at a new one (``task.shards=NEWPATH``, after the data
        moved) with the same fingerprint."""
        where, moved = cfg.shards, cfg.shards != saved.shards
        if not (Path(where) / MANIFEST).is_file():
            raise ConfigError(
                f"the run's shards are not at task.shards={where} (no {os.path.abspath(os.path.join(where, MANIFEST))})"
                + ("" if moved else ": if they moved, pass task.shards=NEWPATH (checked to hold the same data)")
            )
        expected = saved.shards_fingerprint
        if not expected:
            if moved:
                raise ConfigError(
                    f"this run's checkpoint predates dataset fingerprints, so the shards at task.shards={where} "
                    f"cannot be checked to be its data; put them back at {saved.shards} (relative to where it ran)"
                )
            return
        found = cls.data_fingerprint(cfg)
        if found != expected:
            raise ConfigError(
                f"the shards at task.shards={where} are not the data this run was trained on (fingerprint "
                f"{found[:12]}..., the run's {expected[:12]}...): pass task.shards=PATH of the same shards"
            )

    @classmethod
    def from_config(cls, cfg) -> ShardEpisodes:
        cls.check_options(cfg)
        return cls(
            cfg.shards,
            cfg.split_scheme,
            cfg.ways,
            cfg.rotations,
            map_shards_mb=cfg.map_shards_mb,
            class_labels=cfg.labels == "class",
            train_with_val=cfg.train_with_val,
        )

    def check(self, split: str, shots: int, queries: int) -> None:
        """Raise, naming the split or class, if ``split`` cannot give ways x (shots + queries) episodes."""
        pool = self.pool(split)
        classes = len(pool) * (ROTATIONS if self.rotations and split == "train" else 1)
        if self.ways > classes:
            raise ShardError(f"task.ways={self.ways} but split {split!r} has only {classes} classes; lower task.ways")
        small = [self.data.classes[c] for c in pool if self.rows[c] < shots + queries]
        if small:
            c = small[0]
            which = "task.shots + task.queries" if split == "train" else "eval shots + eval.queries"
            raise ShardError(
                f"class {c['name']!r} has {c['rows']} images, fewer than {which} = {shots} + {queries} "
                f"({len(small)} such classes in split {split!r}); lower the shots or queries"
            )

    def sample(
        self, rng: np.random.Generator, num_tasks: int, split: str, shots: int, queries: int, part=slice(None)
    ) -> TaskBatch:
        pool = self.pool(split)
        rotate = self.rotations and split == "train"
        choices = len(pool) * (ROTATIONS if rotate else 1)
        picked = distinct_choices(rng, num_tasks, self.ways, choices)  # [T, N], in random order: the label
        classes, rotation = pool[picked % len(pool)], picked // len(pool)
        # K + Q distinct rows of each chosen class, ordered by a random key, so which of them become
        # the support set is uniformly random. Keys are drawn for the whole batch, used for the part.
        per_class, class_rows = shots + queries, self.rows[classes]
        if class_rows.min() < per_class:  # check() should have caught it; never read past a class
            self.check(split, shots, queries)
        row_keys = rng.random((num_tasks, self.ways, int(class_rows.max())))[part]
        classes, rotation, class_rows = classes[part], rotation[part], class_rows[part]
        row_keys[np.arange(row_keys.shape[-1]) >= class_rows[..., None]] = np.inf
        chosen = np.argpartition(row_keys, per_class - 1, axis=-1)[..., :per_class]
        chosen = np.take_along_axis(chosen, np.argsort(np.take_along_axis(row_keys, chosen, -1), -1), -1)
        rows = chosen + self.first_row[classes][..., None]
        shards = self.shard[classes]
        if shards.size and (shards == shards.flat[0]).all():  # the usual case: one fancy index, one copy
            images = self.data.gather(int(shards.flat[0]), rows)
        else:
            images = np.empty((*rows.shape, *self.data.image_shape), np.uint8)
            for shard in np.unique(shards):
                mask = shards == shard
                images[mask] = self.data.gather(int(shard), rows[mask])
        if rotate:
            for k in range(1, ROTATIONS):
                mask = rotation == k
                images[mask] = np.rot90(images[mask], k, axes=(-2, -1))
        labels = picked[part] if self.class_labels and split == "train" else None  # a rotation is a class of its own
        return TaskBatch.from_episodes(images, shots, labels)
