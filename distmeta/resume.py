"""Continuing a run: which checkpoint, which run folder, which settings may change.

``launch.py --resume latest`` continues the newest run under the log folder (or the one named by
``run_name=``); ``--resume PATH`` continues from a run folder or a checkpoint file (a path or a
``pyarrow.fs`` URI). The run's config comes from its checkpoint. Only settings that do not change
the training's result may differ (the cluster, the step count, logging, evaluation), so the
resumed run's parameters are those of the same run left alone.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from distmeta.checkpoint import STEP_FILE, CheckpointStore, read_checkpoint, split_location, step_name
from distmeta.config import Config, ConfigError, config_from_dict, load_config

# Settings a resumed run may change: where and how it runs, how long, what it logs.
CHANGEABLE = (
    "cluster.",
    "eval.",
    "logdir",
    "run_name",
    "train.steps",
    "train.log_every",
    "train.print_every_s",
    "train.eval_every",
    "train.eval_tasks",
    "train.checkpoint_every",
    "train.checkpoint_keep",
    "train.checkpoint_dir",
    "train.max_rejected_steps",
)


def prepare_resume(target: str, overrides: list[str], settings: dict) -> tuple[Config, Path]:
    """(config, run folder) to pass to ``train(..., resume=True)``, with the run's checkpoint
    folder arranged so that its newest checkpoint is the one to continue from."""
    located = load_config(None, overrides, settings=settings)  # logdir, run_name, checkpoint_dir: where to look
    location, run_dir, state = _locate(target, located)
    base = config_from_dict(state["config"])
    cfg = load_config(None, overrides, settings=settings, base=base.to_dict())
    changed = _changed(base.to_dict(), cfg.to_dict())
    refused = [key for key in changed if not key.startswith(CHANGEABLE)]
    if refused:
        raise ConfigError(
            f"a resumed run keeps the settings that shape its result; cannot change {', '.join(refused)} "
            f"(changeable: {', '.join(k.rstrip('.') + ('.*' if k.endswith('.') else '') for k in CHANGEABLE)}). "
            "Start a new run to change them"
        )
    if changed:
        print(f"resuming with changed settings: {', '.join(f'{k}={v!r}' for k, v in changed.items())}", flush=True)
    step = state["step"]
    if step >= cfg.train.steps:
        raise ConfigError(
            f"{location} is at step {step}, and the run ends at train.steps={cfg.train.steps}: "
            f"pass train.steps=N with N > {step} to train further"
        )
    _arrange(CheckpointStore(_store_location(cfg, run_dir)), location, state)
    return cfg, run_dir


def _locate(target: str, cfg: Config) -> tuple[str, Path, dict]:
    """(checkpoint location, run folder, checkpoint) for ``latest``, a run folder, or a checkpoint
    file (read once: on an object store a large one takes a while)."""
    if target == "latest":
        run_dir = Path(cfg.logdir) / cfg.run_name if cfg.run_name else _newest_run(cfg)
        location, state = _newest_in(CheckpointStore(_store_location(cfg, run_dir)))
        return location, run_dir, state
    folder, name = split_location(target)
    if name.endswith(".pt"):
        state = read_checkpoint(target)
        if "://" not in target and Path(folder).name == "checkpoints":
            return target, Path(folder).parent, state
        saved = config_from_dict(state["config"])
        return target, Path(cfg.logdir) / (saved.run_name or name.removesuffix(".pt")), state
    run_dir = Path(target)
    if not run_dir.is_dir():
        raise ConfigError(
            f"--resume {target}: no such run folder or checkpoint file (give runs/<run>, a .pt, or latest)"
        )
    location, state = _newest_in(CheckpointStore(_store_location(cfg, run_dir)))
    return location, run_dir, state


def _store_location(cfg: Config, run_dir: Path) -> str:
    from distmeta.train import checkpoint_location

    return checkpoint_location(cfg, run_dir)


def _newest_run(cfg: Config) -> Path:
    """The run under the log folder whose newest checkpoint (wherever its store is) is the newest."""
    logdir = Path(cfg.logdir)
    runs = []
    for run_dir in filter(Path.is_dir, logdir.glob("*")):
        written = CheckpointStore(_store_location(cfg, run_dir)).last_modified()
        if written is not None:
            runs.append((written, run_dir))
    if not runs:
        raise ConfigError(f"--resume latest: no run under {logdir} has a checkpoint (pass --logdir, or a path)")
    return max(runs)[1]


def _newest_in(store: CheckpointStore) -> tuple[str, dict]:
    found = store.latest()  # skips (with a warning) checkpoints that fail their checksum
    if found is None:
        raise ConfigError(f"no valid checkpoint in {store.location} to resume from")
    return store.uri(found[0]), found[1]


def _arrange(store: CheckpointStore, location: str, state: dict) -> None:
    """Make ``location`` the newest checkpoint of ``store``: newer ones are moved aside (never
    deleted), and a checkpoint from elsewhere is copied in."""
    step = state["step"]
    moved = store.set_aside(step, f"set-aside-{time.strftime('%Y%m%d-%H%M%S')}")
    if moved:
        print(f"moved {len(moved)} newer checkpoint(s) aside in {store.location}: {', '.join(moved)}", flush=True)
    name = split_location(location)[1]
    in_store = location == store.uri(name) or (store.local and os.path.abspath(location) == store.path(name))
    if not (STEP_FILE.match(name) and in_store):
        store.write(step_name(step), state)


def _changed(before: dict, after: dict, prefix: str = "") -> dict:
    changed = {}
    for key, value in after.items():
        if isinstance(value, dict):
            changed |= _changed(before.get(key, {}), value, f"{prefix}{key}.")
        elif before.get(key) != value:
            changed[f"{prefix}{key}"] = value
    return changed
