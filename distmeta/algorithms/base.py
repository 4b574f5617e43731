"""What every meta-learning algorithm shares: the task-batched forward, the inner loop, losses.

An algorithm is written once, for a chunk of T tasks, in ``chunk_update``: (shared
meta-parameters, T tasks) -> (the SUM of the T tasks' updates, the sums of their metrics). The
update is a (pseudo-)gradient that the parameter server's meta-optimizer descends: the
meta-gradient for MAML, theta - phi for Reptile.

Inside a chunk every task has its own copy of the parameters (a leading task axis). The model runs
on all of them at once with ``torch.func.vmap`` over ``functional_call``, and gradients come from
``torch.autograd.grad``: tasks are independent, so the gradient of the SUM of the task losses with
respect to task t's parameters is task t's own gradient. ``batch_update`` runs the whole batch as
one chunk (``vmap``) or task by task without vmap (``loop``); both are exact, and
``fastest_implementation`` measures which is quicker on the device at hand.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap

from distmeta.config import AlgorithmConfig

Params = dict[str, Tensor]
Task = tuple[Tensor, Tensor, Tensor, Tensor]  # support_x, support_y, query_x, query_y, each [T, ...]
IMPLEMENTATIONS = ("vmap", "loop")


class MetaAlgorithm:
    first_order: bool = False  # True: no gradient flows through the inner loop

    def __init__(self, cfg: AlgorithmConfig, model: nn.Module, kind: str):
        self.cfg, self.model, self.kind = cfg, model, kind
        self._batched = vmap(self._call, randomness="error")

    def chunk_update(self, theta: Params, tasks: Task) -> tuple[Params, dict[str, Tensor]]:
        """Sum over the chunk's tasks of their updates, and of their metrics."""
        raise NotImplementedError

    # --- the model, one copy of the parameters per task ------------------------------------

    def _call(self, params: Params, x: Tensor) -> Tensor:
        return functional_call(self.model, params, (x,))

    def forward(self, params: Params, x: Tensor) -> Tensor:
        """params [T, ...], x [T, N, ...] -> outputs [T, N, ...]; task t uses its own parameters."""
        if x.shape[0] == 1:  # a single task needs no vmap
            return self._call({n: p[0] for n, p in params.items()}, x[0]).unsqueeze(0)
        return self._batched(params, x)

    def task_losses(self, output: Tensor, y: Tensor) -> Tensor:
        """Per-task mean loss, [T]."""
        if self.kind == "classification":
            return F.cross_entropy(output.flatten(0, 1), y.flatten(), reduction="none").view(y.shape).mean(1)
        return (output - y).pow(2).flatten(1).mean(1)

    def scores(self, output: Tensor, y: Tensor, suffix: str = "") -> dict[str, Tensor]:
        """Per-task loss (and accuracy), detached: ``loss<suffix>``, ``accuracy<suffix>``, each [T]."""
        output = output.detach()
        scores = {f"loss{suffix}": self.task_losses(output, y)}
        if self.kind == "classification":
            scores[f"accuracy{suffix}"] = (output.argmax(-1) == y).to(output.dtype).mean(1)
        return scores

    @staticmethod
    def per_task(theta: Params, num_tasks: int) -> Params:
        """Each task's own view of the shared parameters (expand: no copy)."""
        return {n: p.expand(num_tasks, *p.shape) for n, p in theta.items()}

    # --- the inner loop --------------------------------------------------------------------

    def adapt(
        self, params: Params, x: Tensor, y: Tensor, steps: int, create_graph: bool, batch_size: int | None = None
    ) -> Iterator[Params]:
        """Yield the task-adapted parameters after each of ``steps`` inner steps.

        With ``create_graph`` the result stays differentiable with respect to ``params``
        (second order); without it the inner gradients are constants (first order). Step i (from 0)
        uses support examples ``(i * batch_size + j) mod S``: the support set is shot-major (see
        TaskBatch), so every mini-batch holds one shot of each class before the next.
        ``batch_size`` 0 (or None: ``inner_batch_size``) uses the whole support set every step.
        """
        lr = self.cfg.inner_lr
        size = x.shape[1]
        batch_size = self.cfg.inner_batch_size if batch_size is None else batch_size
        batch_size = batch_size if 0 < batch_size < size else size
        second_moment = None
        for step in range(1, steps + 1):
            if batch_size < size:
                index = (torch.arange(batch_size, device=x.device) + (step - 1) * batch_size) % size
                loss = self.task_losses(self.forward(params, x[:, index]), y[:, index]).sum()
            else:
                loss = self.task_losses(self.forward(params, x), y).sum()
            grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()), create_graph=create_graph)))
            if self.cfg.inner_optimizer == "adam":
                # Adam with beta1 = 0, as in the Reptile paper: the only state is the second moment.
                beta2, eps = 0.999, 1e-8
                if second_moment is None:
                    second_moment = {n: torch.zeros_like(g) for n, g in grads.items()}
                second_moment = {n: beta2 * v + (1 - beta2) * grads[n] ** 2 for n, v in second_moment.items()}
                correction = 1 - beta2**step
                params = {
                    n: p - lr * grads[n] / ((second_moment[n] / correction).sqrt() + eps) for n, p in params.items()
                }
            else:
                params = {n: p - lr * grads[n] for n, p in params.items()}
            yield params

    def adapted(self, params: Params, x: Tensor, y: Tensor, steps: int, create_graph: bool) -> Params:
        """The parameters after all ``steps`` inner steps."""
        return deque(self.adapt(params, x, y, steps, create_graph), maxlen=1)[0]

    # --- a batch of tasks --------------------------------------------------------------------

    def batch_update(self, params: Params, tasks: Task, implementation: str) -> tuple[Params, dict[str, float]]:
        """Sum over all tasks of their updates, and the sums of their metrics (floats)."""
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
        theta = {n: p.detach().requires_grad_() for n, p in params.items()}
        num_tasks = len(tasks[0])
        chunks = [tasks] if implementation == "vmap" else [tuple(t[i : i + 1] for t in tasks) for i in range(num_tasks)]
        update_sum: Params = {}
        metric_sums: dict[str, Tensor] = {}
        for chunk in chunks:
            update, metrics = self.chunk_update(theta, chunk)
            for sums, new in ((update_sum, update), (metric_sums, metrics)):
                for name, value in new.items():
                    sums[name] = sums[name] + value if name in sums else value
        names = list(metric_sums)
        values = torch.stack([metric_sums[n] for n in names]).tolist()  # one device sync, not one per metric
        return update_sum, dict(zip(names, values))

    def batch_trajectory(
        self, params: Params, tasks: Task, steps: int, batch_size: int = 0, score_at: set[int] | None = None
    ) -> dict[str, Tensor]:
        """Per-task query loss (and accuracy) after 0, 1, ..., ``steps`` inner steps (mini-batches of
        ``batch_size`` support examples; 0: all): [T, steps + 1]. With ``score_at`` only those
        steps are scored (the query forward costs more than a 1-shot inner step); the rest are NaN."""
        support_x, support_y, query_x, query_y = tasks
        theta = {n: p.detach().requires_grad_() for n, p in params.items()}
        per_task = self.per_task(theta, len(support_x))
        score_at = set(range(steps + 1)) if score_at is None else score_at
        adapted = self.adapt(per_task, support_x, support_y, steps, create_graph=False, batch_size=batch_size)
        points = {}
        for step, current in enumerate(itertools.chain([per_task], adapted)):
            if step in score_at:
                with torch.no_grad():
                    points[step] = self.scores(self.forward(current, query_x), query_y)
        names = next(iter(points.values()))
        missing = torch.full((len(support_x),), float("nan"), dtype=query_x.dtype, device=query_x.device)
        return {n: torch.stack([points[s][n] if s in points else missing for s in range(steps + 1)], 1) for n in names}


def fastest_implementation(algorithm: MetaAlgorithm, params: Params, tasks: Task, repeats: int = 2) -> tuple[str, dict]:
    """Time ``vmap`` and ``loop`` on this batch and device; return the faster and the timings (s)."""
    timings = {}
    for implementation in IMPLEMENTATIONS:
        algorithm.batch_update(params, tasks, implementation)  # warm-up: allocator, kernels, caches
        _synchronize(tasks[0].device)
        start = time.perf_counter()
        for _ in range(repeats):
            algorithm.batch_update(params, tasks, implementation)
        _synchronize(tasks[0].device)
        timings[implementation] = (time.perf_counter() - start) / repeats
    return min(timings, key=timings.get), timings


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
