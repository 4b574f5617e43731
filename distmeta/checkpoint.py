"""Checkpoint files: written atomically, read back with a clear error when they are not usable.

A checkpoint is a ``torch.save``d dict: ``params`` (the flat meta-parameters), ``step``, ``config``
(``Config.to_dict()``) and ``distmeta_version``; the parameter server's also hold ``optimizer``,
the best-validation one ``validation`` (what was measured, on which split)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from distmeta.config import Config, ConfigError, config_from_dict


def write_checkpoint(path: str | Path, state: dict) -> str:
    """Write ``state`` to ``path`` atomically (temporary file, fsync, rename): a reader sees the old
    file or the new one, never half of one. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return str(path)


def load_checkpoint(path: str | Path) -> tuple[Config, np.ndarray, dict]:
    """(config, flat meta-parameters, the whole checkpoint)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} does not exist (runs write them under <logdir>/<run>/checkpoints/)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise ConfigError(
            f"checkpoint {path} cannot be read ({err}); it may be truncated or not a checkpoint"
        ) from None
    if not isinstance(state, dict) or "params" not in state or "config" not in state:
        raise ConfigError(f"{path} is not a distmeta checkpoint (no params/config entries)")
    return config_from_dict(state["config"]), state["params"].numpy(), state
