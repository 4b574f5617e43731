"""Meta-learning algorithms, by name. Add one by writing a ``MetaAlgorithm`` subclass in its own
file (a ``chunk_update`` method) and registering it here."""

from distmeta.algorithms.base import IMPLEMENTATIONS, MetaAlgorithm, fastest_implementation
from distmeta.algorithms.maml import MAML, FirstOrderMAML
from distmeta.algorithms.reptile import Reptile

ALGORITHMS: dict[str, type[MetaAlgorithm]] = {"maml": MAML, "fomaml": FirstOrderMAML, "reptile": Reptile}


def build_algorithm(cfg, model, kind: str) -> MetaAlgorithm:
    return ALGORITHMS[cfg.name](cfg, model, kind)


__all__ = ["ALGORITHMS", "IMPLEMENTATIONS", "MetaAlgorithm", "build_algorithm", "fastest_implementation"]
