"""Prototypical Networks (Snell et al., 2017): each class is the mean of its support embeddings
(its prototype) and a query's class scores are its negative squared Euclidean distances to the
prototypes. Nothing depends on the number of ways, so training may use more ways than testing
(60-way for Omniglot in the paper)."""

from __future__ import annotations

from distmeta.algorithms.metric import MetricAlgorithm


class PrototypicalNetworks(MetricAlgorithm):
    def logits(self, theta, support, one_hot, query):
        prototypes = one_hot.transpose(1, 2) @ support / one_hot.sum(1)[..., None]  # [T, ways, D]
        return -(query[:, :, None] - prototypes[:, None]).pow(2).sum(-1)
