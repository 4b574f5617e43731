"""Sinusoid regression (Finn et al., 2017): y = A sin(x - phase), A ~ U[0.1, 5], phase ~ U[0, pi],
x ~ U[-5, 5]. Procedural, so every split is an independent random stream."""

from __future__ import annotations

import numpy as np

from distmeta.config import ConfigError, ImageFormat
from distmeta.models import DataSpec
from distmeta.tasks.batch import TaskBatch


class Sinusoid:
    kind = "regression"
    fingerprinted = False  # procedural: no data files to find again
    spec = DataSpec(input_shape=(1,), output_dim=1)
    image_format = ImageFormat()  # not images
    splits = ("train", "val", "test")

    def __init__(self, amplitude=(0.1, 5.0), phase=(0.0, np.pi), x_range=(-5.0, 5.0)):
        self.amplitude, self.phase, self.x_range = amplitude, phase, x_range

    @classmethod
    def from_config(cls, cfg) -> Sinusoid:
        return cls()

    @classmethod
    def check_options(cls, cfg) -> None:
        """The sinusoid source reads no task options but the episode sizes (and has no classes)."""
        if cfg.labels == "class":
            raise ConfigError("task.labels=class labels classes; sinusoid is regression (leave task.labels=episode)")
        if cfg.train_with_val:
            raise ConfigError("task.train_with_val=true adds validation classes to training; sinusoid has no classes")

    def check(self, split: str, shots: int, queries: int) -> None:
        """Any number of points can be drawn from a sine: nothing to check."""

    def sample(self, rng: np.random.Generator, num_tasks: int, split: str, shots: int, queries: int, part=slice(None)):
        amplitude = rng.uniform(*self.amplitude, size=(num_tasks, 1, 1))[part]
        phase = rng.uniform(*self.phase, size=(num_tasks, 1, 1))[part]
        x = rng.uniform(*self.x_range, size=(num_tasks, shots + queries, 1))[part]
        y = amplitude * np.sin(x - phase)
        x, y = x.astype(np.float32), y.astype(np.float32)
        return TaskBatch(x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:])
