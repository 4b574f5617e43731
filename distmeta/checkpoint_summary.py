"""What a checkpoint holds, without running it: ``distmeta checkpoint show PATH``. Which learner and
model, trained on what and for how many steps, by which code, its validation score, and what it is
good for. The file is read once, as every reader reads it (checksum verified, nothing in it
executed); a config this version cannot read is summarised as far as it goes and said so."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import shlex
from pathlib import Path
from typing import Any

import distmeta
from distmeta.checkpoint import parse_checkpoint, read_bytes, resumable, version_key, writer_version
from distmeta.config import Config, ConfigError, config_from_dict
from distmeta.rl.setup import is_meta_rl
from distmeta.tasks import SOURCES


@dataclasses.dataclass(frozen=True)
class CheckpointSummary:
    path: str
    size_bytes: int
    sha256: str
    resumable: bool  # holds the meta-optimizer's state: a step file or final.pt
    step: int
    steps: int  # train.steps, the run's budget (0: unknown)
    algorithm: str
    model: str
    parameters: int
    dtype: str
    task: str
    uses: str  # what this version can do with it ("" where the warning says it cannot)
    written_by: str  # the distmeta version that wrote the file
    last_code: str  # the code that wrote the run's last checkpoint before it (a resumed run had others)
    validation: dict | None  # best.pt and its exports: the score it was kept for
    warning: str  # "" where this version reads it all
    config: Any  # as stored

    def lines(self) -> list[str]:
        steps = f"{self.step:,} of {self.steps:,} steps" if self.steps else f"{self.step:,} steps"
        rows = [
            f"{self.path}: {self.size_bytes / 1e6:.2f} MB, sha256 {self.sha256}, checksum verified",
            f"  learner    {self.algorithm} on {self.model}: {self.parameters:,} parameters, {self.dtype}",
            f"  task       {self.task}",
            f"  trained    {steps}, the last of them by distmeta {self.last_code}",
            f"  file       written by distmeta {self.written_by}",
        ]
        if self.validation:
            rows.append(f"  validation {_score(self.validation)}")
        if self.uses:
            rows.append(f"  use        {self.uses}")
        if self.warning:
            rows.append(f"  warning    {self.warning}")
        return rows


def summarize(location: str | Path) -> CheckpointSummary:
    """The summary of the checkpoint at ``location`` (a path or URI); a file that is not a readable
    checkpoint raises ``CheckpointError`` saying why, as every reader does."""
    location = str(location)
    data = read_bytes(location)
    state = parse_checkpoint(location, data)  # the bytes hashed below are the ones checked here
    params, written = state["params"], writer_version(state)
    cfg, warning = None, ""
    if version_key(written) > version_key(distmeta.__version__):
        warning = f"written by distmeta {written}, newer than this {distmeta.__version__}: upgrade distmeta to use it"
    else:
        try:
            cfg = config_from_dict(state["config"])
        except ConfigError as err:
            other = f"; use distmeta {written}, which wrote it" if written != distmeta.__version__ else ""
            warning = f"distmeta {distmeta.__version__} cannot read its config ({err}){other}"
    return CheckpointSummary(
        path=location,
        size_bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        resumable=resumable(state),
        step=_whole(state.get("step")),
        steps=cfg.train.steps if cfg else 0,
        algorithm=cfg.algorithm.name if cfg else "(config not read)",
        model=_model(cfg) if cfg else "(config not read)",
        parameters=params.numel(),
        dtype=str(params.dtype).removeprefix("torch."),
        task=_task(cfg) if cfg else "(config not read)",
        uses=_uses(cfg, state, location) if cfg else "",
        written_by=written,
        last_code=str(state.get("trained_by", state.get("code_version", written))),
        validation=state["validation"] if isinstance(state.get("validation"), dict) else None,
        warning=warning,
        config=state["config"],
    )


def _whole(value: Any) -> int:
    return value if isinstance(value, int) else -1


def _model(cfg: Config) -> str:
    model = cfg.model
    head = ", cosine head" if model.head == "cosine" else ""
    if model.name == "conv4":
        return f"conv4 ({model.filters} filters, {model.downsample}{head})"
    return f"mlp (hidden {model.hidden}{head})" if model.name == "mlp" else model.name


def _task(cfg: Config) -> str:
    task = cfg.task
    if is_meta_rl(cfg):
        return f"{task.source} (meta-RL), {cfg.rl.episodes_per_task} episodes per task"
    if SOURCES[task.source].kind == "regression":
        return f"{task.source} regression, {task.shots} support and {task.queries} query points per task"
    data, image = "synthetic classes", ""
    if task.source == "shards":
        data = (
            f"shards {task.shards} (fingerprint {task.shards_fingerprint[:12] or 'not recorded'}), "
            f"{task.split_scheme} split{' with its validation classes' if task.train_with_val else ''}"
        )
        fmt = task.image_format
        if fmt.channels:
            image = f"; images {fmt.channels}x{fmt.height}x{fmt.width}{', inverted' if fmt.invert else ''}"
    if task.labels == "class":
        batches = f"batches of {task.ways} classes x {task.shots + task.queries} images each"
        return f"supervised over every training class of {data}, {batches}{image}"
    return f"{data}, {task.ways}-way {task.shots}-shot episodes, {task.queries} queries per class{image}"


def _uses(cfg: Config, state: dict, location: str) -> str:
    uses = [f"resumes (distmeta train --resume {shlex.quote(location)})"] if resumable(state) else []
    uses.append("evaluates (distmeta evaluate)")
    if cfg.task.image_format.channels:
        uses.append("adapts to your images (distmeta adapt)")
    export_without_head = cfg.algorithm.name == "baseline" and "trained_by" in state
    if not export_without_head:  # an export of the baseline leaves out the head a run would start from
        uses.append("initialises a new run (train.init_from)")
    return ", ".join(uses)


def _score(validation: dict) -> str:
    row = validation.get("row") if isinstance(validation.get("row"), dict) else {}
    accuracy = row.get("metric", "accuracy" if "accuracy" in str(validation.get("tag")) else "") == "accuracy"
    scale, form, unit = (100, ".1f", "%") if accuracy else (1, ".4g", "")

    def number(value: Any) -> str:
        if not isinstance(value, (int, float)) or math.isnan(value):
            return "n/a"
        return format(value * scale, form)  # an infinite mean (a diverged task) prints as inf

    return (
        f"{validation.get('tag')} {number(validation.get('mean'))} ± {number(validation.get('ci95'))}{unit} "
        f"on {validation.get('tasks')} {validation.get('split', 'val')} tasks"
    )
