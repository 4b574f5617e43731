"""What a checkpoint holds, without running it: ``distmeta checkpoint show PATH``. Which learner and
model, trained on what and for how many steps, by which code, its validation score, and what it is
good for (a training checkpoint resumes; the others adapt, evaluate and initialise). The file is
read as every reader reads it (checksum verified, nothing in it executed); its config is read by
this version where it can be, and said so where it cannot."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import distmeta
from distmeta.checkpoint import file_digest, read_checkpoint, release
from distmeta.config import ConfigError, config_from_dict
from distmeta.rl.setup import META_RL_ALGORITHMS


@dataclasses.dataclass(frozen=True)
class CheckpointSummary:
    path: str
    size_bytes: int
    sha256: str
    kind: str  # training (resumes) | parameters (final.pt, best.pt, an export: no optimizer state)
    step: int
    steps: int  # train.steps: the run's budget
    algorithm: str
    model: str
    parameters: int
    dtype: str
    task: str
    written_by: str  # the distmeta version that wrote the file
    trained_by: str  # the code that trained the parameters (a commit where it ran from a checkout)
    validation: str  # best.pt and its exports: the score it was chosen by; "" otherwise
    readable: str  # "" where this version reads it all; otherwise why not and what to do

    def lines(self) -> list[str]:
        uses = {
            "training": f"a training checkpoint: resumes bit for bit (distmeta train --resume {self.path})",
            "parameters": "parameters and config, no optimizer state (final.pt, best.pt, an export as zoo/ holds): "
            "evaluates, adapts, initialises a run",
        }
        rows = [
            f"{self.path}: {self.size_bytes / 1e6:.2f} MB, sha256 {self.sha256}, checksum verified",
            f"  what       {uses[self.kind]}",
            f"  learner    {self.algorithm} on {self.model}: {self.parameters:,} parameters, {self.dtype}",
            f"  task       {self.task}",
            f"  trained    {self.step:,} of {self.steps:,} steps by distmeta {self.trained_by}; "
            f"file written by {self.written_by}",
        ]
        if self.validation:
            rows.append(f"  validation {self.validation}")
        if self.readable:
            rows.append(f"  warning    {self.readable}")
        return rows


def summarize(location: str | Path) -> CheckpointSummary:
    """The summary of the checkpoint at ``location`` (a path or URI); a file that is not a readable
    checkpoint raises ``CheckpointError`` saying why, as every reader does."""
    location = str(location)
    state = read_checkpoint(location)
    size, sha256 = file_digest(location)
    params = state["params"]
    written_by = str(state.get("distmeta_version", "before 0.2"))
    config, readable = state["config"], ""
    if release(written_by) > release(distmeta.__version__):
        readable = f"written by distmeta {written_by}, newer than this {distmeta.__version__}: upgrade distmeta"
    else:
        try:
            config_from_dict(config)
        except ConfigError as err:
            readable = f"distmeta {distmeta.__version__} cannot read its config ({err}); use distmeta {written_by}"
    return CheckpointSummary(
        path=location,
        size_bytes=size,
        sha256=sha256,
        kind="training" if "optimizer" in state else "parameters",
        step=int(state.get("step", 0)),
        steps=int(_get(config, "train", "steps", default=0)),
        algorithm=str(_get(config, "algorithm", "name")),
        model=_model(config),
        parameters=params.numel(),
        dtype=str(params.dtype).removeprefix("torch."),
        task=_task(config),
        written_by=written_by,
        trained_by=str(state.get("trained_by", state.get("code_version", written_by))),
        validation=_validation(state.get("validation")),
        readable=readable,
    )


def _get(config: dict, section: str, key: str, default: Any = "?") -> Any:
    """A config value read leniently: an old or newer config is still summarised."""
    value = config.get(section, {})
    return value.get(key, default) if isinstance(value, dict) else default


def _model(config: dict) -> str:
    name = _get(config, "model", "name")
    if name == "conv4":
        return f"conv4 ({_get(config, 'model', 'filters')} filters, {_get(config, 'model', 'downsample')})"
    return f"{name} (hidden {_get(config, 'model', 'hidden')})" if name == "mlp" else str(name)


def _task(config: dict) -> str:
    source = _get(config, "task", "source")
    episodes = (
        f"{_get(config, 'task', 'ways')}-way {_get(config, 'task', 'shots')}-shot, "
        f"{_get(config, 'task', 'queries')} queries per class"
    )
    if _get(config, "algorithm", "name") in META_RL_ALGORITHMS:
        return f"{source} (meta-RL), {_get(config, 'rl', 'episodes_per_task')} episodes per task and step"
    if source != "shards":
        return f"{source}, {episodes}"
    fingerprint = str(_get(config, "task", "shards_fingerprint", default=""))[:12] or "not recorded"
    fmt = _get(config, "task", "image_format", default={})
    image = ""
    if isinstance(fmt, dict) and fmt.get("channels"):
        image = f"; images {fmt['channels']}x{fmt['height']}x{fmt['width']}{', inverted' if fmt.get('invert') else ''}"
    return (
        f"shards {_get(config, 'task', 'shards')} (fingerprint {fingerprint}), "
        f"{_get(config, 'task', 'split_scheme')} split, {episodes}{image}"
    )


def _validation(validation: Any) -> str:
    if not isinstance(validation, dict) or "mean" not in validation:
        return ""
    scale, unit = (100, "%") if "accuracy" in str(validation.get("tag", "")) else (1, "")
    return (
        f"{validation.get('tag')} {validation['mean'] * scale:.1f} ± {validation.get('ci95', 0) * scale:.1f}{unit} "
        f"on {validation.get('tasks')} {validation.get('split', 'val')} tasks"
    )
