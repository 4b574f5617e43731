"""Meta-parameters as one flat, contiguous vector.

Parameters and updates cross Ray's object store as a single numpy buffer (zero-copy, one
allocation), and the parameter server's optimizer works on one tensor. ``ParamLayout`` maps that
vector to the named, shaped views that ``torch.func.functional_call`` needs.
"""

from __future__ import annotations

import itertools
import math

import torch

DTYPES = {"float32": torch.float32, "float64": torch.float64}  # train.dtype


class ParamLayout:
    def __init__(self, shapes: dict[str, tuple[int, ...]]):
        self.shapes = dict(shapes)
        self.sizes = {name: math.prod(shape) for name, shape in self.shapes.items()}
        self.size = sum(self.sizes.values())

    @classmethod
    def of(cls, params: dict[str, torch.Tensor]) -> ParamLayout:
        return cls({name: tuple(p.shape) for name, p in params.items()})

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named views into ``flat`` (no copies)."""
        if flat.numel() != self.size:
            raise ValueError(f"flat parameter vector has {flat.numel()} values, the model needs {self.size}")
        views = torch.split(flat, list(self.sizes.values()))
        return {name: view.view(self.shapes[name]) for name, view in zip(self.shapes, views)}

    def flatten(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([tensors[name].reshape(-1) for name in self.shapes])


def flat_parameters(params: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """Named parameters (e.g. an algorithm's ``initial_parameters()``) as one vector in layout order."""
    return ParamLayout.of(params).flatten(params).detach().to(dtype).contiguous()


SHARD_ALIGN = 64  # elements


def shard_bounds(size: int, shards: int) -> list[tuple[int, int]]:
    """The [lo, hi) slices of a ``size``-long vector held by ``shards`` parameter servers
    (``cluster.server_shards``), as even as possible with every cut at a multiple of 64 elements:
    then each element sits in the same lane of the optimizer's vectorised loop as in the whole
    vector, and sharded servers compute exactly what one server does (a cut elsewhere moves
    elements into a loop's scalar tail, which may round differently in the last bit)."""
    blocks = -(-size // SHARD_ALIGN)
    if not 1 <= shards <= blocks:
        raise ValueError(f"{shards} shards for {size} parameters: at most {blocks} (one per {SHARD_ALIGN} parameters)")
    edges = [min(size, SHARD_ALIGN * (blocks * k // shards)) for k in range(shards + 1)]
    return list(itertools.pairwise(edges))
