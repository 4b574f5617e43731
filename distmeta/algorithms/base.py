"""What every meta-learning algorithm shares: the task-batched forward, the inner loop, losses.

An algorithm is written once, for a chunk of T tasks, in ``chunk_update``: (shared
meta-parameters, T tasks) -> (the SUM of the T tasks' updates, the sums of their metrics). The
update is a (pseudo-)gradient that the parameter server's meta-optimizer descends: the
meta-gradient for MAML, theta - phi for Reptile.

Inside a chunk every task has its own copy of the parameters (a leading task axis). The model runs
on all of them at once with ``torch.func.vmap`` over ``functional_call``, and gradients come from
``torch.autograd.grad``: tasks are independent, so the gradient of the SUM of the task losses with
respect to task t's parameters is task t's own gradient. ``batch_update`` runs the whole batch as
one chunk (``vmap``), as one chunk through batched matrix products where the model is made of linear
layers (``batched``, batched.py: an MLP), task by task without vmap (``loop``), or on a CPU with
the tasks split over its cores, one thread each (``threads``, threads.py); all are exact, and
``fastest_implementation`` measures which is quicker on the device at hand.

Gradient-based learners describe their inner loop with ``inner_loop``, an ``InnerLoop``: which
parameters are adapted, on which inputs, with which step sizes. MAML, first-order MAML and Reptile
use the default (every model parameter, on the support images, at ``inner_lr``); ANIL and Meta-SGD
override it. Learners without an inner loop build on ``metric.py``.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap

from distmeta.algorithms import batched
from distmeta.algorithms.threads import TaskThreads
from distmeta.config import AlgorithmConfig, Config, ConfigError
from distmeta.tasks.batch import TaskTensors

Params = dict[str, Tensor]
IMPLEMENTATIONS = ("vmap", "loop", "batched", "threads")


@dataclass
class InnerLoop:
    """One chunk's inner-loop problem: what the inner loop adapts, on which inputs, with which steps."""

    params: Params  # per task, [T, ...]: the parameters the inner loop changes
    forward: Callable[[Params, Tensor], Tensor]  # (those parameters, inner-loop inputs) -> outputs
    support: Tensor  # the inputs the inner loop fits (the support images, or ANIL's features of them)
    predict: Callable[[Params, Tensor], Tensor]  # (those parameters, raw images) -> outputs
    lr: float | Params  # one step size, or one per parameter entry (Meta-SGD)


class MetaAlgorithm:
    first_order: bool = False  # True: no gradient flows through the inner loop
    adaptive: bool = True  # False: metric-based, nothing is adapted per task (evaluated at 0 inner steps)
    uses_head: bool = True  # False: the model is built without its head and returns embeddings
    learned_inner_lr: bool = False  # True: the inner step sizes are meta-parameters, not inner_lr
    supervised: bool = False  # True: trained on task.labels=class, a head over every training class (baseline)
    # the algorithm.* settings this learner reads (besides name and implementation): another one set
    # away from its default would change nothing, so a new run refuses it (assemble.check_new_run)
    reads: tuple[str, ...] = ("inner_lr", "inner_steps", "inner_optimizer", "inner_batch_size")

    def __init__(self, cfg: AlgorithmConfig, model: nn.Module, kind: str):
        self.cfg, self.model, self.kind = cfg, model, kind
        self.model_names = [name for name, _ in model.named_parameters()]
        self.batched_layers = False  # run: batched matrix products instead of vmap (the batched implementation)
        self.device = next(model.parameters()).device
        self.task_threads: TaskThreads | None = None  # the threads implementation's, made at its first use

    def __getstate__(self) -> dict:
        """What a copy takes (``copy.deepcopy``: the threads implementation's own copies): not the threads."""
        return self.__dict__ | {"task_threads": None}

    @classmethod
    def check(cls, cfg: Config, kind: str) -> None:
        """Raise a ``ConfigError`` if this learner cannot run ``cfg`` on tasks of ``kind`` (a task
        source's: regression or classification). A learner with rules of its own extends it."""
        a = cfg.algorithm
        if a.inner_optimizer == "adam" and cls.adaptive and not cls.first_order:
            raise ConfigError(
                f"algorithm.inner_optimizer=adam needs a first-order algorithm (fomaml, reptile), "
                f"not {a.name}: differentiating through Adam's square root is unstable"
            )
        if cfg.model.head != "linear" and not cls.supervised:  # the one learner checked with it in float64
            raise ConfigError(
                f"model.head={cfg.model.head} is Baseline++'s classifier, for algorithm.name=baseline; "
                f"{a.name} takes model.head=linear"
            )
        if cfg.task.labels == "class" and not cls.supervised:
            raise ConfigError(
                f"task.labels=class labels images with their training class, for algorithm.name=baseline; "
                f"{a.name} learns from episodes labelled 0..ways-1: leave task.labels=episode"
            )

    def chunk_update(
        self, theta: Params, tasks: TaskTensors, score_before: bool = True
    ) -> tuple[Params, dict[str, Tensor]]:
        """Sum over the chunk's tasks of their updates, and of their metrics. An adaptive learner
        scores the query set before adaptation (``*_before``) only with ``score_before``: it costs
        a forward pass the update does not need."""
        raise NotImplementedError

    def initial_parameters(self) -> Params:
        """The meta-parameters before training: the model's, and any the algorithm learns besides."""
        return {name: p.detach() for name, p in self.model.named_parameters()}

    # --- the model, one copy of the parameters per task ------------------------------------

    def run(self, module: nn.Module, params: Params, x: Tensor, shared: bool = False) -> Tensor:
        """``module`` on x [T, N, ...] -> [T, N, ...]. Task t uses its own parameters (params [T, ...])
        or, with ``shared``, all tasks the same ones. Either way each task is its own batch, so batch
        statistics never mix tasks."""
        if self.batched_layers and batched.supports(module):
            return batched.forward(module, params, x, shared)
        if x.shape[0] == 1:  # a single task needs no vmap
            # squeeze, not [0]: a view whose backward is a view too (indexing's scatters into zeros)
            single = {n: p if shared else p.squeeze(0) for n, p in params.items()}
            return functional_call(module, single, (x[0],)).unsqueeze(0)
        call = lambda p, inputs: functional_call(module, p, (inputs,))  # noqa: E731
        return vmap(call, in_dims=(None if shared else 0, 0), randomness="error")(params, x)

    def forward(self, params: Params, x: Tensor) -> Tensor:
        """The whole model, params [T, ...], x [T, N, ...] -> outputs [T, N, ...]."""
        return self.run(self.model, params, x)

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
            wide = torch.promote_types(output.dtype, torch.float32)  # a bf16 mean over 75 queries is off by 0.1%
            scores[f"accuracy{suffix}"] = (output.argmax(-1) == y).to(wide).mean(1)
        return scores

    @staticmethod
    def per_task(theta: Params, num_tasks: int) -> Params:
        """Each task's own view of the shared parameters (expand: no copy; for one task unsqueeze,
        whose backward is a view where expand's is a sum)."""
        if num_tasks == 1:
            return {n: p.unsqueeze(0) for n, p in theta.items()}
        return {n: p.expand(num_tasks, *p.shape) for n, p in theta.items()}

    # --- the inner loop --------------------------------------------------------------------

    def inner_loop(self, theta: Params, tasks: TaskTensors) -> InnerLoop:
        """What the inner loop adapts: by default every model parameter, on the support images, with
        ``inner_lr``. ANIL and Meta-SGD override this one method."""
        params = self.per_task({n: theta[n] for n in self.model_names}, len(tasks.support_x))
        return InnerLoop(params, self.forward, tasks.support_x, self.forward, self.cfg.inner_lr)

    def adapt(
        self, loop: InnerLoop, y: Tensor, steps: int, create_graph: bool, batch_size: int | None = None
    ) -> Iterator[Params]:
        """Yield the task-adapted parameters after each of ``steps`` inner steps.

        With ``create_graph`` the result stays differentiable with respect to ``loop.params`` (and a
        learned ``loop.lr``): second order. Without it the inner gradients are constants (first
        order). Step i (from 0) uses support examples ``(i * batch_size + j) mod S``: the support set
        is shot-major (see TaskBatch), so every mini-batch holds one shot of each class before the
        next. ``batch_size`` 0 (or None: ``inner_batch_size``) uses the whole support set every step.
        """
        params, x, lr = loop.params, loop.support, loop.lr
        size = x.shape[1]
        batch_size = self.cfg.inner_batch_size if batch_size is None else batch_size
        batch_size = batch_size if 0 < batch_size < size else size
        step_size = lr if isinstance(lr, dict) else dict.fromkeys(params, lr)
        second_moment = None
        for step in range(1, steps + 1):
            if batch_size < size:
                index = (torch.arange(batch_size, device=x.device) + (step - 1) * batch_size) % size
                loss = self.task_losses(loop.forward(params, x[:, index]), y[:, index]).sum()
            else:
                loss = self.task_losses(loop.forward(params, x), y).sum()
            grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()), create_graph=create_graph)))
            if self.cfg.inner_optimizer == "adam":
                # Adam with beta1 = 0, as in the Reptile paper: the only state is the second moment.
                beta2, eps = 0.999, 1e-8
                if second_moment is None:
                    second_moment = {n: torch.zeros_like(g) for n, g in grads.items()}
                second_moment = {n: beta2 * v + (1 - beta2) * grads[n] ** 2 for n, v in second_moment.items()}
                correction = 1 - beta2**step
                grads = {n: g / ((second_moment[n] / correction).sqrt() + eps) for n, g in grads.items()}
            params = {n: p - step_size[n] * grads[n] for n, p in params.items()}
            yield params

    def adapted(
        self, loop: InnerLoop, y: Tensor, steps: int, create_graph: bool, batch_size: int | None = None
    ) -> Params:
        """The parameters after all ``steps`` inner steps (``adapt``'s last)."""
        return deque(self.adapt(loop, y, steps, create_graph, batch_size), maxlen=1)[0]

    # --- a batch of tasks --------------------------------------------------------------------

    def implementations(self) -> tuple[str, ...]:
        """The implementations that differ for this model here: ``batched`` only where its body is
        made of linear layers (elsewhere it would be vmap under another name), ``threads`` only on
        a CPU with more than one torch thread (with one it is the loop)."""
        names = ["vmap", "loop"]
        names += ["batched"] if batched.supports(self.model.features) else []
        names += ["threads"] if self.device.type == "cpu" and torch.get_num_threads() > 1 else []
        return tuple(names)

    def batch_update(
        self, params: Params, tasks: TaskTensors, implementation: str, score_before: bool = True
    ) -> tuple[Params, dict[str, float]]:
        """Sum over all tasks of their updates, and the sums of their metrics (floats)."""
        update_sum, metric_sums = self.batch_sums(params, tasks, implementation, score_before)
        names = list(metric_sums)
        values = torch.stack([metric_sums[n] for n in names]).tolist()  # one device sync, not one per metric
        return update_sum, dict(zip(names, values))

    def batch_sums(
        self, params: Params, tasks: TaskTensors, implementation: str, score_before: bool = True
    ) -> tuple[Params, dict[str, Tensor]]:
        """``batch_update`` with the metric sums left on the device, as 0-dim tensors (no sync)."""
        runnable = self.implementations()
        if self.device.type == "cpu" and "threads" not in runnable:
            runnable += ("threads",)  # on one torch thread: the loop
        if implementation not in runnable:
            raise ValueError(f"implementation must be one of {runnable} here, got {implementation!r}")
        tasks = TaskTensors(*tasks)
        if implementation == "threads" and torch.get_num_threads() > 1 and len(tasks.support_x) > 1:
            return self._task_threads(torch.get_num_threads()).batch_sums(params, tasks, score_before)
        theta = {n: p.detach().requires_grad_() for n, p in params.items()}
        one_chunk = implementation not in ("loop", "threads")  # threads on one thread or task: the loop
        chunks = [tasks] if one_chunk else [tasks.task(i) for i in range(len(tasks.support_x))]
        update_sum: Params = {}
        metric_sums: dict[str, Tensor] = {}
        with self._batched_layers(implementation == "batched"):
            for chunk in chunks:
                update, metrics = self.chunk_update(theta, chunk, score_before)
                for sums, new in ((update_sum, update), (metric_sums, metrics)):
                    for name, value in new.items():
                        sums[name] = sums[name] + value if name in sums else value
        return update_sum, metric_sums

    def _task_threads(self, count: int) -> TaskThreads:
        """The threads implementation's ``count`` threads, made at its first use (or anew when the
        process's torch thread count changed)."""
        if self.task_threads is None or self.task_threads.count != count:
            if self.task_threads is not None:
                self.task_threads.pool.shutdown(wait=False)
            self.task_threads = TaskThreads(self, count)
        return self.task_threads

    @contextlib.contextmanager
    def _batched_layers(self, on: bool):
        before, self.batched_layers = self.batched_layers, on
        try:
            yield
        finally:
            self.batched_layers = before

    def batch_trajectory(
        self,
        params: Params,
        tasks: TaskTensors,
        steps: int,
        batch_size: int = 0,
        score_at: set[int] | None = None,
        transductive: bool = True,
    ) -> dict[str, Tensor]:
        """Per-task query loss (and accuracy) after 0, 1, ..., ``steps`` inner steps (mini-batches of
        ``batch_size`` support examples; 0: all): [T, steps + 1]. With ``score_at`` only those
        steps are scored (the query forward costs more than a 1-shot inner step); the rest are NaN.
        Without ``transductive`` each query example is scored alone with the support set
        (``one_query_at_a_time``)."""
        tasks = TaskTensors(*tasks)
        support_x, support_y, query_x, query_y = tasks
        theta = {n: p.detach().requires_grad_() for n, p in params.items()}
        loop = self.inner_loop(theta, tasks)
        score_at = set(range(steps + 1)) if score_at is None else score_at
        adapted = self.adapt(loop, support_y, steps, create_graph=False, batch_size=batch_size)
        points = {}
        for step, current in enumerate(itertools.chain([loop.params], adapted)):
            if step in score_at:
                with torch.no_grad():
                    predict = functools.partial(loop.predict, current)
                    output = predict(query_x) if transductive else one_query_at_a_time(predict, support_x, query_x)
                    points[step] = self.scores(output, query_y)
        names = next(iter(points.values()))
        missing = torch.full((len(support_x),), float("nan"), dtype=query_x.dtype, device=query_x.device)
        return {n: torch.stack([points[s][n] if s in points else missing for s in range(steps + 1)], 1) for n in names}


def one_query_at_a_time(predict: Callable[[Tensor], Tensor], support_x: Tensor, query_x: Tensor) -> Tensor:
    """Non-transductive outputs for the query set: each query example goes through the network in
    one batch with the support set and no other query, so batch statistics never carry information
    from one query example to another (the Reptile paper's non-transductive protocol)."""
    outputs = [predict(torch.cat([support_x, query_x[:, q : q + 1]], 1))[:, -1] for q in range(query_x.shape[1])]
    return torch.stack(outputs, 1)


def fastest_implementation(
    algorithm: MetaAlgorithm, params: Params, tasks: TaskTensors, repeats: int = 2, implementations=None
) -> tuple[str, dict]:
    """Time ``implementations`` (default: all that differ for the algorithm's model) on this batch and
    device; return the fastest and the timings (s): each one's quickest of ``repeats`` runs, the
    runs interleaved (forward, then backward order), so a drift or a burst of other work on the
    machine (the other workers timing at the same moment) does not fall on one implementation alone."""
    names = list(implementations or algorithm.implementations())
    for implementation in names:
        algorithm.batch_update(params, tasks, implementation)  # warm-up: allocator, kernels, caches
    timings = dict.fromkeys(names, float("inf"))
    for run in range(repeats):
        for implementation in names if run % 2 == 0 else reversed(names):
            _synchronize(tasks.support_x.device)
            start = time.perf_counter()
            algorithm.batch_update(params, tasks, implementation)
            _synchronize(tasks.support_x.device)
            timings[implementation] = min(timings[implementation], time.perf_counter() - start)
    return min(timings, key=timings.get), timings


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
