"""Meta-learning algorithms, by name, and the transfer-learning baseline they are compared with
(baseline.py). Add one in its own file: a ``MetaAlgorithm`` subclass with a ``chunk_update``
(base.py); for a MAML variant, a ``MAML`` subclass overriding ``inner_loop``; for a metric-based
learner, a ``MetricAlgorithm`` subclass (metric.py) with ``logits``. Then register it in
``ALGORITHMS``."""

from dataclasses import replace

import numpy as np
import torch

from distmeta.algorithms.anil import ANIL
from distmeta.algorithms.base import IMPLEMENTATIONS, MetaAlgorithm, fastest_implementation
from distmeta.algorithms.baseline import TransferBaseline
from distmeta.algorithms.maml import MAML, FirstOrderMAML
from distmeta.algorithms.matchingnet import MatchingNetworks
from distmeta.algorithms.metasgd import MetaSGD
from distmeta.algorithms.protonet import PrototypicalNetworks
from distmeta.algorithms.reptile import Reptile
from distmeta.models import DataSpec, build_model
from distmeta.params import DTYPES, flat_parameters

ALGORITHMS: dict[str, type[MetaAlgorithm]] = {
    "maml": MAML,
    "fomaml": FirstOrderMAML,
    "reptile": Reptile,
    "anil": ANIL,
    "metasgd": MetaSGD,
    "protonet": PrototypicalNetworks,
    "matchingnet": MatchingNetworks,
    "baseline": TransferBaseline,
}


def build_algorithm(cfg, model, kind: str) -> MetaAlgorithm:
    """The algorithm ``cfg.name`` (an ``AlgorithmConfig``) around a given model."""
    return ALGORITHMS[cfg.name](cfg, model, kind)


def build_learner(
    cfg, spec: DataSpec, kind: str, device: torch.device | None = None, dtype: torch.dtype = torch.float32
) -> MetaAlgorithm:
    """A run's algorithm (``cfg`` is a ``Config``) and its model, on ``device`` in ``dtype``.
    Metric-based learners get the model without its head."""
    headless = not ALGORITHMS[cfg.algorithm.name].uses_head
    model = build_model(cfg.model, replace(spec, output_dim=0) if headless else spec).to(device, dtype)
    return build_algorithm(cfg.algorithm, model, kind)


def initial_parameters(cfg, source) -> np.ndarray:
    """A run's initial meta-parameters as one flat vector in ``train.dtype``: the model's (and the
    algorithm's own) initialisation under ``train.seed``."""
    torch.manual_seed(cfg.train.seed)
    dtype = DTYPES[cfg.train.dtype]  # built in it: Meta-SGD's 0.01 must not pass through float32
    learner = build_learner(cfg, source.spec, source.kind, dtype=dtype)
    return flat_parameters(learner.initial_parameters(), dtype).numpy()


__all__ = [
    "ALGORITHMS",
    "IMPLEMENTATIONS",
    "MetaAlgorithm",
    "build_algorithm",
    "build_learner",
    "fastest_implementation",
    "initial_parameters",
]
