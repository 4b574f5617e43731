"""How a step travels through the actors. Both engines mean the same thing: step t's workers use
exactly the parameters after step t - 1, and the driver may submit steps ahead of their results.

  compiled  (default) one Ray compiled graph for the whole run: the actors exchange the step's
            control message, parameters, tasks and updates over shared-memory channels, with no
            per-step task scheduling. Per-step coordination is about a third of ``tasks``'s.
  tasks     ordinary actor calls chained through object refs. Works wherever Ray does; use it if a
            cluster cannot run compiled graphs.

While a compiled graph is live its actors run nothing else, so checkpoints and parameter snapshots
for evaluation ride on the step's control message instead of separate calls.
"""

from __future__ import annotations

import ray
from ray.dag import InputNode

from distmeta.runtime.control import StepControl


class CompiledEngine:
    def __init__(self, server, workers, generators, max_inflight_steps: int, timeout_s: float):
        with InputNode() as control:
            params = server.parameters.bind(control)
            results = [
                worker.compute.bind(control, params, generators[rank % len(generators)].batch_for.bind(control, rank))
                for rank, worker in enumerate(workers)
            ]
            graph = server.apply.bind(control, *results)
        self.graph = graph.experimental_compile(
            _max_inflight_executions=max_inflight_steps + 1, _submit_timeout=timeout_s
        )

    def submit(self, control: StepControl):
        return self.graph.execute(control)

    def close(self) -> None:
        self.graph.teardown()


class TaskEngine:
    def __init__(self, server, workers, generators, max_inflight_steps: int, timeout_s: float):
        self.server, self.workers, self.generators = server, workers, generators
        self.params = server.parameters.remote()

    def submit(self, control: StepControl):
        results = [
            worker.compute.remote(
                control, self.params, self.generators[rank % len(self.generators)].batch_for.remote(control, rank)
            )
            for rank, worker in enumerate(self.workers)
        ]
        metrics = self.server.apply.remote(control, *results)
        self.params = self.server.parameters.remote(control)  # runs after apply: actor calls keep their order
        return metrics

    def close(self) -> None:
        pass


ENGINES = {"compiled": CompiledEngine, "tasks": TaskEngine}


def result(ref, timeout_s: float) -> dict:
    """A step's metrics; raises if the step failed or took longer than ``timeout_s``."""
    return ray.get(ref, timeout=timeout_s)
