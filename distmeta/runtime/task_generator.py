"""Task generation: an actor that builds each step's meta-batch ahead of the workers.

The task stream's batch ``draw`` depends only on (seed, draw), and synchronous step t takes draw t,
so a step's data is the same whatever the number of generators or workers, and resuming needs only
the next draw (the cursor). A background thread fills a bounded queue (``prefetch_batches`` draws
deep) with the slices of the workers this generator serves, so by the time a worker asks for step
t, its tasks are usually ready. Each generator serves a contiguous block of workers and builds only
that block's tasks.

In asynchronous mode (``train.mode=async``) a worker takes whole meta-batches as they come
(``next_batch``); the stream's batches are the synchronous steps' (draw t from (seed, t)), and
``G`` generators deal them out in turn: generator g builds draws g, g + G, g + 2G, ...
"""

from __future__ import annotations

import queue
import threading
import time

from distmeta.config import Config, ConfigError
from distmeta.data.shards import ShardError
from distmeta.runtime.control import StepControl
from distmeta.tasks import TaskBatch, build_source, task_rng


class TaskGenerationError(RuntimeError):
    """The generator could not build a step's tasks (bad data, a shard changed under the run); the
    message names the step and the original error. Not a fault: a re-run would fail the same way."""


class BadTaskData(TaskGenerationError):
    """A ``TaskGenerationError`` from bad input (a shard or an option): its message says it all."""


def split_evenly(total: int, parts: int) -> list[int]:
    """``total`` tasks over ``parts`` workers, sizes differing by at most one."""
    base, extra = divmod(total, parts)
    return [base + (i < extra) for i in range(parts)]


def generator_blocks(num_workers: int, num_generators: int) -> list[list[int]]:
    """The workers each generator serves: contiguous blocks of ranks, as even as possible."""
    blocks, start = [], 0
    for size in split_evenly(num_workers, min(num_generators, num_workers)):
        blocks.append(list(range(start, start + size)))
        start += size
    return blocks


class TaskGenerator:
    def __init__(
        self,
        cfg: Config,
        shares: list[int],
        ranks: list[int],
        start_draw: int = 0,
        prefetch: bool = True,
        stride: int = 1,
    ):
        """Serve workers ``ranks`` (contiguous) their ``shares[rank]`` tasks of every ``stride``-th
        draw of the task stream from ``start_draw`` on."""
        if ranks != list(range(ranks[0], ranks[-1] + 1)):
            raise ValueError(f"a task generator serves a contiguous block of workers, not {ranks}")
        self.cfg, self.shares, self.ranks = cfg, shares, ranks
        self.source = build_source(cfg.task)
        bounds = [0]
        for share in shares:
            bounds.append(bounds[-1] + share)
        self.part = slice(bounds[ranks[0]], bounds[ranks[-1] + 1])  # this generator's tasks of each step
        self.bounds = {rank: (bounds[rank] - self.part.start, bounds[rank + 1] - self.part.start) for rank in ranks}
        self.ready: queue.Queue = queue.Queue(maxsize=cfg.cluster.prefetch_batches)
        self.current_draw, self.current = -1, {}
        self.next_draw, self.stride = start_draw, stride
        self.failure: TaskGenerationError | None = None  # the producer's error, once it has stopped on one
        if prefetch:
            threading.Thread(target=self._produce, daemon=True, name="task-prefetch").start()

    def build(self, draw: int) -> dict[int, TaskBatch]:
        """The slices of the task stream's meta-batch ``draw`` for this generator's workers."""
        task = self.cfg.task
        rng = task_rng(self.cfg.train.seed, "train", draw)
        batch = self.source.sample(rng, sum(self.shares), "train", task.shots, task.queries, self.part)
        batch.produced_at, batch.first_task, batch.draw = time.time(), self.part.start, draw
        return {rank: batch.slice(*self.bounds[rank]) for rank in self.ranks}

    def _produce(self) -> None:
        draw = self.next_draw
        while True:
            try:
                item = (draw, self.build(draw))
            except Exception as err:  # "step": a synchronous run's step t is draw t, and users read steps
                message = f"the task generator could not build step {draw}: {type(err).__name__}: {err}"
                kind = BadTaskData if isinstance(err, ShardError | ConfigError) else TaskGenerationError
                item = (draw, kind(message).with_traceback(err.__traceback__))
            self.ready.put(item)  # blocks while the queue is full: the bound on prefetching
            if isinstance(item[1], Exception):
                return
            draw += self.stride

    def batch_for(self, control: StepControl, rank: int) -> TaskBatch:
        """Worker ``rank``'s tasks for ``control.step`` (synchronous mode: step t takes draw t);
        steps are asked for in order, except when Ray re-runs a call to rebuild a lost object,
        which gets the draw rebuilt."""
        if control.step < self.current_draw:
            return self.build(control.step)[rank]
        if control.step != self.current_draw:
            draw, slices = self._next_ready()
            if draw != control.step:
                raise RuntimeError(f"task generator produced step {draw} but step {control.step} was asked for")
            self.current_draw, self.current = draw, slices
        return self.current[rank]

    def batches_for(self, controls: list[StepControl], rank: int) -> list[TaskBatch]:
        """Worker ``rank``'s tasks for each of the consecutive steps ``controls`` (one call's)."""
        return [self.batch_for(control, rank) for control in controls]

    def next_batch(self) -> TaskBatch:
        """The next meta-batch of the stream (asynchronous mode: one generator, one whole batch each)."""
        _, slices = self._next_ready()
        return slices[self.ranks[0]]

    def _next_ready(self) -> tuple[int, dict[int, TaskBatch]]:
        """The next draw the producer built (its index and slices). Once it has stopped on an error, every later call
        raises that error too: the queue stays empty, and a call waiting on it would hold up the
        run's teardown (a compiled graph waits for each actor's loop to finish its call)."""
        if self.failure is None:
            draw, slices = self.ready.get()
            if isinstance(slices, TaskGenerationError):
                self.failure = slices
        if self.failure is not None:
            raise self.failure
        return draw, slices
