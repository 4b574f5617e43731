"""What metric-based learners share (Prototypical and Matching Networks): no inner loop.

The model is built without its head: it embeds. Each episode's support and query images go through
it together, one batch per task (each task its own batch statistics), and a learner defines only
``logits``: how each query example is scored against the embedded, labelled support set. The
update is the gradient of the query cross-entropy; metrics are ``loss`` and ``accuracy``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from distmeta.algorithms.base import MetaAlgorithm, Params, one_query_at_a_time
from distmeta.config import ConfigError
from distmeta.tasks.batch import TaskTensors


class MetricAlgorithm(MetaAlgorithm):
    adaptive = False
    uses_head = False
    reads = ()

    @classmethod
    def check(cls, cfg, kind):
        super().check(cfg, kind)
        if kind != "classification":
            name, source = cfg.algorithm.name, cfg.task.source
            raise ConfigError(f"algorithm.name={name} classifies; task.source={source} is {kind}")
        if any(cfg.eval.inner_steps):
            raise ConfigError(
                f"algorithm.name={cfg.algorithm.name} has no inner loop; set eval.inner_steps=[0] (or leave it empty)"
            )
        if cfg.eval.inner_batch_size:
            raise ConfigError(
                f"eval.inner_batch_size={cfg.eval.inner_batch_size}: algorithm.name={cfg.algorithm.name} has no inner "
                "loop to batch; leave it at 0"
            )

    def logits(self, theta: Params, support: Tensor, one_hot: Tensor, query: Tensor) -> Tensor:
        """Embeddings support [T, S, D] with one-hot labels [T, S, ways], query [T, Q, D] -> class
        scores [T, Q, ways]."""
        raise NotImplementedError

    def query_logits(self, theta: Params, tasks: TaskTensors, transductive: bool = True) -> Tensor:
        support_x, support_y, query_x, query_y = tasks
        weights = {n: theta[n] for n in self.model_names}
        # Labels are 0..ways-1; the count comes from both sets, once per chunk (it syncs a GPU).
        ways = int(torch.maximum(support_y.max(), query_y.max())) + 1
        one_hot = F.one_hot(support_y, ways).to(support_x.dtype)
        support_size = support_x.shape[1]

        def predict(x: Tensor) -> Tensor:  # support images followed by query images, per task
            embedded = self.run(self.model, weights, x, shared=True)
            return self.logits(theta, embedded[:, :support_size], one_hot, embedded[:, support_size:])

        if transductive:
            return predict(torch.cat([support_x, query_x], 1))
        return one_query_at_a_time(predict, support_x, query_x)

    def chunk_update(self, theta, tasks, score_before=True):  # nothing is adapted: no "before"
        query_y = tasks.query_y
        logits = self.query_logits(theta, tasks)
        grads = torch.autograd.grad(self.task_losses(logits, query_y).sum(), list(theta.values()))
        return dict(zip(theta, grads)), {name: v.sum() for name, v in self.scores(logits, query_y).items()}

    def batch_trajectory(self, params, tasks, steps, batch_size=0, score_at=None, transductive=True):
        """Query loss and accuracy, [T, 1]: there are no inner steps to score after."""
        if steps:
            raise ValueError(f"{type(self).__name__} has no inner loop; evaluate it at 0 inner steps")
        tasks = TaskTensors(*tasks)
        with torch.no_grad():
            scores = self.scores(self.query_logits(params, tasks, transductive), tasks.query_y)
        return {name: values[:, None] for name, values in scores.items()}
