"""MAML (Finn et al., 2017): the meta-gradient of the query loss after K inner SGD steps,
differentiated through those steps (second order). First-order MAML drops the inner Jacobian: its
inner gradients are constants, so its meta-gradient is the query-loss gradient at the adapted
parameters."""

from __future__ import annotations

import torch

from distmeta.algorithms.base import MetaAlgorithm


class MAML(MetaAlgorithm):
    first_order = False

    def chunk_update(self, theta, tasks, score_before=True):
        _, support_y, query_x, query_y = tasks
        loop = self.inner_loop(theta, tasks)
        adapted = self.adapted(loop, support_y, self.cfg.inner_steps, create_graph=not self.first_order)
        output_after = loop.predict(adapted, query_x)
        query_loss = self.task_losses(output_after, query_y).sum()
        meta_grad = dict(zip(theta, torch.autograd.grad(query_loss, list(theta.values()))))
        metrics = self.scores(output_after, query_y, "_after")
        if score_before:
            with torch.no_grad():
                metrics |= self.scores(loop.predict(loop.params, query_x), query_y, "_before")
        return meta_grad, {name: values.sum() for name, values in metrics.items()}


class FirstOrderMAML(MAML):
    first_order = True
