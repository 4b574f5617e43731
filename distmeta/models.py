"""Models: the MAML paper's sinusoid MLP and the Conv4 backbone used for few-shot images.

Models are plain ``nn.Module``s. Algorithms never call them directly: they run them with
``torch.func.functional_call`` on a dict of (possibly adapted, per-task) parameters, so a model
must keep no state that changes in ``forward``. That is why BatchNorm uses batch statistics only
(``track_running_stats=False``), as in MAML's reference implementation.

Every model is ``features`` (an embedding of width ``feature_dim``) followed by a ``head``: linear,
or cosine (``model.head``, ``CosineHead``; ``head_kind`` says which, also of a model built
without its head, whose head a learner makes at test). ANIL adapts only the head; metric-based learners
(ProtoNets, Matching Networks) build the model with ``output_dim=0``, which makes the head an
``nn.Identity`` so the model returns the embedding itself.

To add a backbone, write an ``nn.Module`` with a ``from_config(cfg, spec)`` classmethod, the
``features``, ``head``, ``head_kind`` (``make_head``) and ``feature_dim`` above, and the class
attributes the rest of the code asks of a model: ``task_kind`` (the ``kind`` of task source it
fits), ``batch_norm`` (whether it uses batch statistics), ``linear_layers`` (whether the
``batched`` implementation can run it) and ``children_in_order`` (whether ``forward`` applies its
children in order). Register it in ``MODELS``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from distmeta.config import ModelConfig


@dataclass(frozen=True)
class DataSpec:
    """What a task source feeds a model: input shape of one example and the output width."""

    input_shape: tuple[int, ...]
    output_dim: int


class CosineHead(nn.Module):
    """Scores s g_c cos(f, v_c) (Chen et al., 2019, Baseline++, as their code's ``distLinear``): each
    class's direction v_c (``weight``) compared with the feature by angle alone, times a norm g_c
    learned per class (``norm``: their weight normalisation, which starts g at v's own norm), and a
    fixed scale s: a softmax over more classes needs larger scores to grow confident."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)  # nn.Linear's initialisation, as theirs
        self.norm = nn.Parameter(self.weight.detach().norm(dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cosine_scores(x, self.weight, self.norm)


def cosine_scores(features: torch.Tensor, weight: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """s g_c cos(f, v_c): features [..., N, D], class directions [..., classes, D] and norms [..., classes]
    -> [..., N, classes]; s is 2 for up to 200 classes, else 10 (their code's rule)."""
    scale = 2.0 if weight.shape[-2] <= 200 else 10.0
    cosines = F.normalize(features, dim=-1) @ F.normalize(weight, dim=-1).transpose(-1, -2)
    return scale * norm.unsqueeze(-2) * cosines


def make_head(kind: str, in_features: int, out_features: int) -> nn.Module:
    """The model's ``head``: ``model.head``'s kind, or the embedding itself for ``out_features`` 0."""
    if not out_features:
        return nn.Identity()
    return CosineHead(in_features, out_features) if kind == "cosine" else nn.Linear(in_features, out_features)


class MLP(nn.Module):
    """Fully connected ReLU network, 1-40-40-1 for sinusoid regression (Finn et al., 2017)."""

    task_kind = "regression"  # the kind of task source it fits (a source's ``kind``)
    batch_norm = False  # no batch statistics: scoring a query batch at once is not transductive
    linear_layers = True  # linear layers only: the batched implementation (algorithms/batched.py) applies
    children_in_order = True  # forward is features then head, as batched.forward runs it

    @classmethod
    def from_config(cls, cfg: ModelConfig, spec: DataSpec) -> MLP:
        (in_features,) = spec.input_shape
        return cls(in_features, list(cfg.hidden), spec.output_dim, cfg.head)

    def __init__(self, in_features: int, hidden: list[int], out_features: int, head: str = "linear"):
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            width = size
        self.features = nn.Sequential(*layers)
        self.feature_dim = width
        self.head, self.head_kind = make_head(head, width, out_features), head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class Conv4(nn.Module):
    """Four blocks of [3x3 conv, BatchNorm, ReLU, 2x2 max-pool or stride 2], flattened, then a linear head.

    Omniglot: 64 filters on 1x28x28. mini-ImageNet: 32 filters on 3x84x84 with max-pooling.
    """

    task_kind = "classification"
    batch_norm = True  # on batch statistics: a query batch scored at once informs each example
    linear_layers = False
    children_in_order = True

    @classmethod
    def from_config(cls, cfg: ModelConfig, spec: DataSpec) -> Conv4:
        channels, height, width = spec.input_shape
        if height != width:
            raise ValueError(f"conv4 expects square images, got {height}x{width}")
        return cls(channels, height, cfg.filters, spec.output_dim, cfg.downsample, cfg.head)

    def __init__(
        self, in_channels: int, image_size: int, filters: int, out_features: int, downsample: str, head: str = "linear"
    ):
        super().__init__()
        blocks: list[nn.Module] = []
        channels, size = in_channels, image_size
        for _ in range(4):
            stride = 2 if downsample == "stride" else 1
            blocks += [
                nn.Conv2d(channels, filters, kernel_size=3, stride=stride, padding=1),
                nn.BatchNorm2d(filters, track_running_stats=False),
                nn.ReLU(),
            ]
            if downsample == "max_pool":
                blocks.append(nn.MaxPool2d(2))
                size //= 2
            else:
                size = (size + 1) // 2
            channels = filters
        if size < 1:
            raise ValueError(f"image_size {image_size} is too small for four downsampling blocks")
        self.features = nn.Sequential(*blocks, nn.Flatten())
        self.feature_dim = filters * size * size
        self.head, self.head_kind = make_head(head, self.feature_dim, out_features), head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


MODELS: dict[str, type[nn.Module]] = {"mlp": MLP, "conv4": Conv4}


def build_model(cfg: ModelConfig, spec: DataSpec) -> nn.Module:
    """The model ``cfg.name`` (a ``ModelConfig``) for data of ``spec``."""
    return MODELS[cfg.name].from_config(cfg, spec)
