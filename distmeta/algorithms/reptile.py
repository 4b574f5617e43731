"""Reptile (Nichol et al., 2018): adapt each task with k steps of SGD or Adam (beta1 = 0), then move
the meta-parameters towards the adapted ones. The update sent to the parameter server is
theta - phi; its SGD outer step with learning rate epsilon gives theta + epsilon * mean(phi - theta)."""

from __future__ import annotations

import torch

from distmeta.algorithms.base import MetaAlgorithm


class Reptile(MetaAlgorithm):
    first_order = True

    def chunk_update(self, theta, tasks, score_before=True):
        _, support_y, query_x, query_y = tasks
        loop = self.inner_loop(theta, tasks)
        adapted = self.adapted(loop, support_y, self.cfg.inner_steps, create_graph=False)
        with torch.no_grad():
            update = {name: (loop.params[name] - adapted[name]).sum(0) for name in theta}
            metrics = self.scores(loop.predict(adapted, query_x), query_y, "_after")
            if score_before:
                metrics |= self.scores(loop.predict(loop.params, query_x), query_y, "_before")
        return update, {name: values.sum() for name, values in metrics.items()}
