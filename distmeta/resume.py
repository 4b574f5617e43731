"""Continuing a run: which checkpoint, which run folder, which settings may change.

``prepare_resume`` decides which checkpoint a resume continues from, in which run folder, and
refuses any change to a setting that shapes the training's result (those outside ``CHANGEABLE``,
and ``task.shards`` unless the data there is the same), so the resumed run ends with the parameters
of the same run left alone (docs/reliability.md, "Resume.").
"""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from pathlib import Path

from distmeta.checkpoint import (
    FINAL_NAME,
    STEP_FILE,
    BestCheckpoint,
    CheckpointError,
    CheckpointStore,
    checkpoint_location,
    read_checkpoint,
    resumable,
    split_location,
    step_name,
)
from distmeta.config import Config, ConfigError, config_from_dict, load_config
from distmeta.runfolder import claim, release
from distmeta.tasks import SOURCES

# Settings a resumed run may change: where and how it runs, how long, what it logs.
CHANGEABLE = (
    "cluster.",
    "algorithm.implementation",  # the same math; a run records the one auto chose (resume on new hardware: auto)
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
    "train.deterministic",  # GPU kernels that sum in another order: like another layout (train.tf32 is other math)
)


def prepare_resume(target: str, overrides: list[str], settings: dict) -> tuple[Config, Path]:
    """(config, run folder) to pass to ``train(..., resume=True)``, with the run's checkpoint
    folder arranged so that its newest checkpoint is the one to continue from."""
    located = load_config(None, overrides, settings=settings)  # logdir, run_name, checkpoint_dir: where to look
    location, run_dir, state = _locate(target, located)
    _check_resumable(location, state)
    base = config_from_dict(state["config"])
    cfg = load_config(None, overrides, settings=settings, base=base.to_dict())
    check_same_data(base, cfg)  # a moved dataset is accepted at its new path if it is the same data
    changed = _changed(base.to_dict(), cfg.to_dict())
    refused = [key for key in changed if not key.startswith(CHANGEABLE) and key != "task.shards"]
    if refused:
        raise ConfigError(
            f"a resumed run keeps the settings that shape its result; cannot change {', '.join(refused)} "
            f"(changeable: {', '.join(k.rstrip('.') + ('.*' if k.endswith('.') else '') for k in CHANGEABLE)}). "
            "Start a new run to change them"
        )
    if "train.steps" in changed and cfg.meta_optimizer.final_lr is not None:
        raise ConfigError(
            f"train.steps={cfg.train.steps}: this run anneals its learning rate linearly over train.steps="
            f"{base.train.steps} (meta_optimizer.final_lr), so another length would change the rate of every "
            "step still to come; resume with the same train.steps, or start a new run"
        )
    if changed:
        print(f"resuming with changed settings: {', '.join(f'{k}={v!r}' for k, v in changed.items())}", flush=True)
    step = state["step"]
    if step >= cfg.train.steps:
        further = (
            f"train further in a new run from its parameters (train.init_from={location}): its learning rate "
            "anneals over train.steps (meta_optimizer.final_lr), which a resume keeps"
            if cfg.meta_optimizer.final_lr is not None
            else f"pass train.steps=N with N > {step} to train further"
        )
        raise ConfigError(f"{location} is at step {step}, and the run ends at train.steps={cfg.train.steps}: {further}")
    store = CheckpointStore(checkpoint_location(cfg, run_dir))
    claim(run_dir)  # before anything moves: the run folder may be another live run's
    try:
        if cfg.run_name != base.run_name and not _in_store(store, location) and store.step_files():
            raise ConfigError(
                f"run_name={cfg.run_name}: run {run_dir} already has checkpoints in {store.location}; to continue "
                f"{location} under a new name, give a run_name that is not taken"
            )
        _arrange(store, location, state)
    except BaseException:
        release(run_dir)
        raise
    return cfg, run_dir


def _check_resumable(location: str, state: dict) -> None:
    """Refuse, before anything is touched, a checkpoint that holds parameters but not the state a
    run continues from (best.pt has no meta-optimizer state)."""
    if not resumable(state):
        raise ConfigError(
            f"{location} holds the parameters only (no meta-optimizer state: best.pt keeps the best validation "
            "parameters, not the run), so a run cannot continue from it. Resume from the run's folder, a step_*.pt "
            f"or final.pt, or start a new run from these parameters with train.init_from={location}"
        )


def check_same_data(saved: Config, cfg: Config) -> None:
    """The data ``cfg`` names is that of the run ``saved`` came from, for a source whose data is
    fingerprinted (its ``check_same_data``: shards may have moved to a new path); others have no
    data to check."""
    source = SOURCES.get(cfg.task.source)  # an unknown name is for check_run (or the refused change) to report
    if source is not None and source.fingerprinted:
        source.check_same_data(saved.task, cfg.task)


def _locate(target: str, cfg: Config) -> tuple[str, Path, dict]:
    """(checkpoint location, run folder, checkpoint) for ``latest``, a run folder, or a checkpoint
    file (read once: on an object store a large one takes a while)."""
    if target == "latest":
        run_dir = Path(cfg.logdir) / cfg.run_name if cfg.run_name else _newest_run(cfg)
        location, state = _newest_in(CheckpointStore(checkpoint_location(cfg, run_dir)))
        return location, run_dir, state
    folder, name = split_location(target)
    if name.endswith(".pt"):
        state = read_checkpoint(target)
        if "://" not in target and Path(folder).name == "checkpoints":
            own = Path(folder).parent
        else:
            own = Path(cfg.logdir) / (config_from_dict(state["config"]).run_name or name.removesuffix(".pt"))
        return target, _named(cfg, own), state
    run_dir = Path(target)
    if not run_dir.is_dir():
        raise ConfigError(
            f"--resume {target}: no such run folder or checkpoint file (give runs/<run>, a .pt, or latest)"
        )
    location, state = _newest_in(CheckpointStore(checkpoint_location(cfg, run_dir)))
    return location, _named(cfg, run_dir), state


def _named(cfg: Config, own: Path) -> Path:
    """The run folder a resume writes to: the checkpoint's own run, unless ``run_name=`` names
    another (then the run continues there, and the checkpoint's own run is left as it is)."""
    return Path(cfg.logdir) / cfg.run_name if cfg.run_name and cfg.run_name != own.name else own


def _newest_run(cfg: Config) -> Path:
    """The run under the log folder whose newest checkpoint (wherever its store is) is the newest."""
    logdir = Path(cfg.logdir)
    runs = []
    for run_dir in filter(Path.is_dir, logdir.glob("*")):
        written = CheckpointStore(checkpoint_location(cfg, run_dir)).last_modified()
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
    deleted), and a checkpoint from elsewhere is copied in. That copy never replaces a file: the
    store's own checkpoint of the same step is moved aside with the newer ones. ``final.pt`` goes
    aside too (the run goes on past it), and ``best.pt`` if it is of a later step (the resumed run
    has not reached it, and would compete with a future it replaces)."""
    step = state["step"]
    copied = not (STEP_FILE.match(split_location(location)[1]) and _in_store(store, location))
    newest = step - 1 if copied else step
    moved = [name for at, name in store.step_files() if at > newest]
    names = store.names()
    if FINAL_NAME in names:
        moved.append(FINAL_NAME)
    if BestCheckpoint.NAME in names:
        with contextlib.suppress(CheckpointError, KeyError, TypeError):  # unreadable: left for the run to replace
            if store.read(BestCheckpoint.NAME)["step"] > step:
                moved.append(BestCheckpoint.NAME)
    aside = f"set-aside-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"  # two resumes in a second: two folders
    store.set_aside(moved, aside)
    if moved:
        print(f"moved {len(moved)} checkpoint(s) aside in {store.location}: {', '.join(moved)}", flush=True)
    if copied:
        store.write(step_name(step), state)


def _in_store(store: CheckpointStore, location: str) -> bool:
    name = split_location(location)[1]
    return location == store.uri(name) or (store.local and os.path.abspath(location) == store.path(name))


def _changed(before: dict, after: dict, prefix: str = "") -> dict:
    changed = {}
    for key, value in after.items():
        if isinstance(value, dict):
            changed |= _changed(before.get(key, {}), value, f"{prefix}{key}.")
        elif before.get(key) != value:
            changed[f"{prefix}{key}"] = value
    return changed
