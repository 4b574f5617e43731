"""ANIL, Almost No Inner Loop (Raghu et al., 2020): MAML whose inner loop adapts only the model's
linear head. The body's features are computed once per task; the meta-gradient still reaches the
body, through those features, and is second order through the head's inner steps. With
``algorithm.inner_batch_size`` the inner mini-batches are slices of those features, whose batch
statistics span the whole support set (as learn2learn's ANIL computes them), not MAML with a frozen
body, which would normalise each mini-batch by itself."""

from __future__ import annotations

from distmeta.algorithms.base import InnerLoop
from distmeta.algorithms.maml import MAML


class ANIL(MAML):
    def inner_loop(self, theta, tasks):
        support_x = tasks.support_x
        body = {n.removeprefix("features."): p for n, p in theta.items() if n.startswith("features.")}
        head = {n.removeprefix("head."): p for n, p in theta.items() if n.startswith("head.")}

        def features(x):
            return self.run(self.model.features, body, x, shared=True)

        def head_forward(params, feature_batch):
            return self.run(self.model.head, params, feature_batch)

        def predict(params, x):
            return head_forward(params, features(x))

        params = self.per_task(head, len(support_x))
        return InnerLoop(params, head_forward, features(support_x), predict, self.cfg.inner_lr)
