"""Datasets on disk: Arrow shards (``shards.py``) and the ingest that writes them (``omniglot.py``,
``folder.py``, ``fashion_mnist.py``, ``glyphs.py``; ``images.py``: an image file -> a model input)."""

from pathlib import Path

# Where Debian's packages install the datasets `distmeta data build` reads by default
FASHION_MNIST_DEBIAN = Path("/usr/share/datasets/fashion-mnist")  # apt-get install dataset-fashion-mnist
NOTO_DEBIAN = Path("/usr/share/fonts/truetype/noto")  # apt-get install fonts-noto-core
