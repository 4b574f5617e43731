"""Synthetic N-way K-shot image classification: each class is a fixed random template, and its
examples are noisy copies. Learnable, download-free and shaped like Omniglot or mini-ImageNet, for
tests and benchmarks of the image path before real shards are at hand. A fifth of the classes are
held out; validation and test episodes both come from them (different episodes: each split has its
own stream), so best.pt is chosen on the test classes: report final.pt's test score."""

from __future__ import annotations

import numpy as np

from distmeta.config import ConfigError, ImageFormat
from distmeta.models import DataSpec
from distmeta.tasks.batch import TaskBatch

_TEMPLATE_SEED = 20170703  # the class templates are part of the dataset, fixed across runs
_NOISE = 48.0


class SyntheticClasses:
    kind = "classification"
    fingerprinted = False  # generated from fixed seeds: no data files to find again
    splits = ("train", "val", "test")

    def __init__(self, num_classes: int, ways: int, channels: int, image_size: int, class_labels: bool = False):
        if num_classes < 2 * ways:
            raise ConfigError(
                f"synthetic source: task.num_classes={num_classes} leaves fewer than task.ways={ways} "
                "classes in a split (the test split is a fifth of them); raise num_classes"
            )
        self.ways, self.class_labels = ways, class_labels
        self.image_format = ImageFormat(channels=channels, height=image_size, width=image_size)
        rng = np.random.default_rng(_TEMPLATE_SEED)
        self.templates = rng.integers(0, 256, size=(num_classes, channels, image_size, image_size)).astype(np.float32)
        cut = num_classes - max(ways, num_classes // 5)
        self.classes = {
            "train": np.arange(cut),
            "val": np.arange(cut, num_classes),
            "test": np.arange(cut, num_classes),
        }
        # with class_labels, one output per training class (task.labels=class)
        self.spec = DataSpec(input_shape=(channels, image_size, image_size), output_dim=cut if class_labels else ways)

    @classmethod
    def from_config(cls, cfg) -> SyntheticClasses:
        return cls(cfg.num_classes, cfg.ways, cfg.channels, cfg.image_size, class_labels=cfg.labels == "class")

    @classmethod
    def check_options(cls, cfg) -> None:
        """The task options (a ``TaskConfig``) can make this source: its classes are generated at init,
        which checks them, and cheaply (templates only)."""
        if cfg.train_with_val:  # they are its test classes too
            raise ConfigError("task.train_with_val=true: the synthetic source's validation classes are its test ones")
        cls.from_config(cfg)

    def check(self, split: str, shots: int, queries: int) -> None:
        """Examples are generated, so any shots and queries work; the split sizes are checked at init."""

    def sample(self, rng: np.random.Generator, num_tasks: int, split: str, shots: int, queries: int, part=slice(None)):
        pool = self.classes[split]
        # argsort of uniform noise: N distinct classes per task, in random order, for all tasks at once.
        picks = np.argsort(rng.random((num_tasks, len(pool))), axis=1)[:, : self.ways]
        classes = pool[picks][part]  # [T, N]; label i is the i-th picked class, so labels are permuted
        # The noise is most of the work: one seed per task, so a part draws only its own tasks' noise.
        noise_seeds = rng.integers(0, 2**63, num_tasks)[part]
        shape = (self.ways, shots + queries, *self.templates.shape[1:])
        noise = np.empty((len(noise_seeds), *shape))
        for task, seed in enumerate(noise_seeds):
            noise[task] = np.random.default_rng(seed).normal(0.0, _NOISE, shape)
        images = np.clip(self.templates[classes][:, :, None] + noise, 0, 255).astype(np.uint8)  # [T, N, K+Q, C, H, W]
        labels = pool[picks][part] if self.class_labels and split == "train" else None  # train's pool is 0..cut-1
        return TaskBatch.from_episodes(images, shots, labels)
