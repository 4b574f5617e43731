"""The transfer-learning baseline meta-learning is compared with (Chen et al., 2019, "A Closer Look at
Few-shot Classification": Baseline): supervised pre-training of the same network as a classifier
over every training class, then, for a new task, a new head on its support set.

Training sees the runtime's episodes with ``task.labels=class``: each image labelled with its
training class, and every image of the step (support and query alike) is one minibatch of the
cross-entropy over all training classes; the update is its gradient, descended by the meta-optimizer
like any other. At test the trained head is dropped: a new one starts at the support set's class
centroids of the features (weight 2c, bias -|c|^2, so its scores are the negative squared distances
up to a per-query constant: the nearest-centroid classifier, which is the score after 0 steps), or
at zero (``algorithm.head_init=zero``: a fresh head, as Chen et al. fine-tune, though their code
starts it at random and trains it by SGD with momentum on mini-batches of 4; with one shot the
centroid head already fits the support set, so its steps barely move it), and each inner step is
SGD on the support set's cross-entropy of that head (``algorithm.finetune=head``, the features
fixed) or of the whole network (``all``), at ``algorithm.inner_lr``. Its BatchNorm uses batch
statistics throughout, as every learner here: the support features the head is fitted to are
normalised over the support set, and a query's over its own batch (the query set, or the support
set and that query: ``eval.transductive``); Chen et al. test with running statistics instead.

Baseline++ is the same with ``model.head=cosine`` (models.CosineHead): pre-training scores
s g_c cos(f, v_c) over the training classes, and the new head scores the same way, starting at the
centroids' unit directions with every g_c at 1 (0 steps: the nearest centroid by angle; unit
directions make a step's size independent of the features' scale).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distmeta.algorithms.base import InnerLoop, MetaAlgorithm
from distmeta.config import ConfigError
from distmeta.models import cosine_scores


class TransferBaseline(MetaAlgorithm):
    first_order = True  # nothing is differentiated through the test-time steps
    supervised = True  # trained on task.labels=class, one output per training class
    # at test (its steps: eval.inner_steps; inner_steps picks the validation row best.pt is judged on)
    reads = ("inner_lr", "inner_steps", "inner_optimizer", "finetune", "head_init")

    @classmethod
    def check(cls, cfg, kind):
        super().check(cfg, kind)
        if kind != "classification":
            raise ConfigError(f"algorithm.name=baseline classifies; task.source={cfg.task.source} is {kind}")
        if cfg.task.labels != "class":
            raise ConfigError(
                "algorithm.name=baseline pre-trains a classifier over every training class: set task.labels=class"
            )
        if cfg.model.head == "cosine" and cfg.algorithm.head_init == "zero":
            raise ConfigError(
                "algorithm.head_init=zero with model.head=cosine: a zero weight has no direction to compare "
                "features with; use algorithm.head_init=centroid"
            )

    def chunk_update(self, theta, tasks, score_before=True):  # no inner loop in training: no "before"
        support_x, support_y, query_x, query_y = tasks
        x, y = torch.cat([support_x, query_x], 1), torch.cat([support_y, query_y], 1)
        weights = {n: theta[n] for n in self.model_names}
        logits = self.run(self.model, weights, x, shared=True)  # each episode its own batch statistics
        grads = torch.autograd.grad(self.task_losses(logits, y).sum(), list(weights.values()))
        return dict(zip(weights, grads)), {name: v.sum() for name, v in self.scores(logits, y).items()}

    def inner_loop(self, theta, tasks):
        support_x, support_y = tasks.support_x, tasks.support_y
        body = {n: p.detach() for n, p in theta.items() if n.startswith("features.")}
        shared_features = self.run(self.model.features, _strip(body), support_x, shared=True)
        cosine = self.model.head_kind == "cosine"  # also of an export's model, built without its training head
        head = _centroid_head(shared_features.detach(), support_y, cosine)
        if self.cfg.head_init == "zero":
            head = {n: torch.zeros_like(p) for n, p in head.items()}
        scores = _cosine if cosine else _linear
        if self.cfg.finetune == "head":
            params = {n: p.requires_grad_() for n, p in head.items()}

            def predict(params, x):
                return scores(params, self.run(self.model.features, _strip(body), x, shared=True))

            return InnerLoop(params, scores, shared_features.detach(), predict, self.cfg.inner_lr)
        copies = {n: p.expand(len(support_x), *p.shape).clone() for n, p in body.items()}  # each task its own
        params = {n: p.requires_grad_() for n, p in (copies | head).items()}

        def forward(params, x):
            features = self.run(self.model.features, _strip({n: params[n] for n in body}), x)
            return scores(params, features)

        return InnerLoop(params, forward, support_x, forward, self.cfg.inner_lr)


def _centroid_head(features: torch.Tensor, labels: torch.Tensor, cosine: bool) -> dict[str, torch.Tensor]:
    """A head [T, ways, D] at each class's mean feature c: linear, scoring -|f - c|^2 + |f|^2; or
    cosine, scoring s cos(f, c): direction c / |c|, norm 1."""
    ways = int(labels.max()) + 1
    one_hot = F.one_hot(labels, ways).to(features.dtype)  # [T, S, ways]
    centroids = one_hot.transpose(1, 2) @ features / one_hot.sum(1)[..., None]
    if cosine:
        return {"head.weight": F.normalize(centroids, dim=-1), "head.norm": torch.ones_like(centroids[..., 0])}
    return {"head.weight": 2 * centroids, "head.bias": -centroids.pow(2).sum(-1)}


def _linear(params: dict[str, torch.Tensor], features: torch.Tensor) -> torch.Tensor:
    """Each task's head on its features: [T, N, D] -> [T, N, ways]."""
    return features @ params["head.weight"].transpose(1, 2) + params["head.bias"][:, None]


def _cosine(params: dict[str, torch.Tensor], features: torch.Tensor) -> torch.Tensor:
    """Each task's cosine head (``CosineHead``, with the scale of its number of ways) on its features."""
    return cosine_scores(features, params["head.weight"], params["head.norm"])


def _strip(body: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n.removeprefix("features."): p for n, p in body.items()}
