"""What a training step means, in one process and without Ray: the task generator builds step t's
batch, the worker computes its update at the parameters after step t - 1, the parameter server's
meta-optimizer applies it. The engines (engine.py) move these same objects' messages between
actors; tests check a run of the system against this loop, and benchmarks time distmeta's core
with it."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from distmeta.algorithms import initial_parameters
from distmeta.config import Config
from distmeta.runtime.control import Schedule, StepControl, StepMetrics
from distmeta.runtime.parameter_server import ParameterServer
from distmeta.runtime.task_generator import TaskGenerator
from distmeta.runtime.worker import Worker
from distmeta.tasks import TaskBatch, build_source


class LocalLoop:
    """One worker, one generator and one server in this process (the whole meta-batch, one shard)."""

    def __init__(self, cfg: Config, device: torch.device | None = None):
        cfg = dataclasses.replace(cfg, cluster=dataclasses.replace(cfg.cluster, server_shards=1))  # same math
        self.cfg, self.schedule = cfg, Schedule.of(cfg.train)
        source = build_source(cfg.task)
        source.check("train", cfg.task.shots, cfg.task.queries)  # impossible episodes named, as training does
        self.generator = TaskGenerator(cfg, [cfg.train.meta_batch_size], [0], prefetch=False)
        self.worker = Worker(cfg, device=device or torch.device("cpu"))
        self.server = ParameterServer(cfg, initial_parameters(cfg, source))

    def step(self, step: int, batch: TaskBatch | None = None) -> StepMetrics:
        """Step ``step`` (from 0) on its batch of the task stream (or on ``batch``), scoring before
        adaptation on logging steps as training does; no checkpoints, no published parameters."""
        control = StepControl(step, score_before=self.schedule.logs(step + 1))
        batch = self.generator.build(step)[0] if batch is None else batch
        return self.server.apply(control, self.worker.compute(control, batch, self.server.parameters()))

    def run(self, steps: int | None = None) -> list[StepMetrics]:
        """Steps 0 .. ``steps`` - 1 (default: ``train.steps``); the metrics of each."""
        return [self.step(step) for step in range(self.cfg.train.steps if steps is None else steps)]

    def parameters(self) -> np.ndarray:
        """The meta-parameters now (a copy)."""
        return self.server.parameters().copy()
