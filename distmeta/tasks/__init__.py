"""Task sources: where episodes come from.

A source turns a numpy ``Generator`` into a ``TaskBatch`` of independent tasks. It is pure and
deterministic, so the task-generation actor can rebuild any batch of the stream from (seed, draw)
and a run's data does not depend on how many actors serve it. ``part`` asks for a contiguous slice
of the batch: the random draws still cover the whole batch (so the slice is exactly those tasks of
the whole), but only the slice's data is built, so several generators split the work. To add a
dataset, write a source with what ``TaskSource`` below lists (``kind``, ``fingerprinted``, ``image_format``,
``spec``, ``splits``, ``check_options``, ``check``, ``sample``; a fingerprinted one also ``data_fingerprint``
and ``check_same_data``) and a ``from_config(cfg)`` classmethod, which ``build_source`` calls, and
register it in ``SOURCES``.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from distmeta.config import ImageFormat
from distmeta.models import DataSpec
from distmeta.tasks.batch import TaskBatch
from distmeta.tasks.episodes import ShardEpisodes
from distmeta.tasks.sinusoid import Sinusoid
from distmeta.tasks.synthetic import SyntheticClasses


class TaskSource(Protocol):
    kind: str  # "regression" or "classification"
    # whether its data is files that a run records the fingerprint of (``task.shards_fingerprint``),
    # so that a resumed or evaluated run finds the same data, also where it has moved to
    fingerprinted: bool
    image_format: ImageFormat  # how its images were made from files; ImageFormat() if it has none

    @property
    def spec(self) -> DataSpec: ...

    @property
    def splits(self) -> tuple[str, ...]: ...  # which of "train", "val", "test" it has

    @classmethod
    def check_options(cls, cfg) -> None:
        """Raise a ``ConfigError`` if the task options (a ``TaskConfig``) cannot make this source; cheap,
        before a run starts (the data itself is checked when the source is made)."""

    def check(self, split: str, shots: int, queries: int) -> None:
        """Raise a clear error if ``split`` cannot give episodes of this size."""

    def sample(
        self, rng: np.random.Generator, num_tasks: int, split: str, shots: int, queries: int, part: slice = slice(None)
    ) -> TaskBatch:
        """Tasks ``part`` of a batch of ``num_tasks``: equal to ``sample(...)[part]``."""

    # A fingerprinted source also has, as classmethods on the task options (``TaskConfig``):
    #   data_fingerprint(cfg) -> str: the fingerprint of the data the options name
    #   check_same_data(saved, cfg) -> None: raise a ``ConfigError`` unless the options ``cfg`` name
    #     the data of the run whose options were ``saved`` (at the same path, or a new one)


SOURCES = {"sinusoid": Sinusoid, "synthetic": SyntheticClasses, "shards": ShardEpisodes}

# Disjoint random streams: training batches come from (seed, TRAIN, draw), held-out evaluation
# tasks from (eval seed, EVAL, index), so evaluation never sees a training task's randomness.
STREAMS = {"train": 0, "val": 1, "test": 2}


def build_source(cfg) -> TaskSource:
    """The source named by ``cfg.source`` (a ``TaskConfig``)."""
    return SOURCES[cfg.source].from_config(cfg)


def task_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, STREAMS[split], index])
