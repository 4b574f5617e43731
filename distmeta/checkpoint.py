"""Checkpoints: self-verifying files in a folder that is local or any ``pyarrow.fs`` URI.

A checkpoint is a tensor file (``distmeta.tensorfile``), so reading one never runs code and a
truncated or altered one fails its checksum. ``CheckpointStore`` is one run's checkpoint folder;
it writes atomically, so a failed write leaves the earlier checkpoints as they were.
``checkpoint_record`` and ``read_checkpoint`` build and read a checkpoint, ``BestCheckpoint`` keeps
``best.pt``, and ``convert_legacy`` rewrites one of the earlier pickle-based format. What a
checkpoint holds and what a run's folder contains: docs/reliability.md, "Checkpoints." and
"Checkpoints from distmeta 0.1".
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import hashlib
import io
import logging
import math
import os
import pickle
import re
import subprocess
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import torch

import distmeta
from distmeta import tensorfile
from distmeta.config import Config, ConfigError, config_from_dict
from distmeta.report import HIGHER_IS_BETTER, EvalRow

log = logging.getLogger(__name__)
# The earlier format was a torch.save pickle, which is a zip archive. (A tensor file starts with its header's
# length, which would have to be 64 MiB to look like this.)
PICKLE_MAGIC = b"PK\x03\x04"
STEP_FILE = re.compile(r"^step_(\d{8,})\.pt$")
FINAL_NAME = "final.pt"  # the parameters after the last step


class CheckpointError(ConfigError):
    """A checkpoint that cannot be written or read; the message names the file and what to do."""


def step_name(step: int) -> str:
    return f"step_{step:08d}.pt"


class CheckpointStore:
    """One run's checkpoint folder: a local path, ``file://...``, ``s3://...``, ``gs://...``, or any
    other URI ``pyarrow.fs.FileSystem.from_uri`` understands (so every node of a cluster sees it)."""

    def __init__(self, location: str | Path):
        self.location = str(location)
        self.fs, self.root = filesystem(self.location)
        self.local = isinstance(self.fs, pafs.LocalFileSystem)

    def path(self, name: str) -> str:
        return f"{self.root.rstrip('/')}/{name}"

    def uri(self, name: str) -> str:
        """Where ``name`` is, as the user wrote the location (a path, or a URI)."""
        return join_location(self.location, name)

    def check_writable(self) -> None:
        """Fail now, not at the first checkpoint an hour in, if the folder cannot be written."""
        try:
            self.fs.create_dir(self.root, recursive=True)
            probe_write(self.root, self.fs)
        except Exception as err:
            raise CheckpointError(
                f"cannot write checkpoints to {self.location} ({err}); choose a writable train.checkpoint_dir "
                "(or --logdir), or fix the folder's permissions"
            ) from None

    def write(self, name: str, state: dict) -> str:
        """Write ``state`` as ``name`` atomically, with its checksum; returns where it is."""
        data = tensorfile.dumps(state)
        final, tmp = self.path(name), self.path(f".{name}.tmp-{os.getpid()}")
        try:
            self.fs.create_dir(self.root, recursive=True)
            if self.local:
                _write_local(tmp, final, data)
            else:  # object stores publish an object whole; move is their closest thing to rename
                with self.fs.open_output_stream(tmp) as f:
                    f.write(data)
                self.fs.move(tmp, final)
        except OSError as err:
            _remove_quietly(self.fs, tmp)
            full = getattr(err, "errno", None) in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
            raise CheckpointError(
                f"could not write checkpoint {self.uri(name)}: {err}. "
                + ("The disk is full: free space, " if full else "Check the folder, ")
                + "then resume with --resume latest; the earlier checkpoints are untouched"
            ) from None
        return self.uri(name)

    def read(self, name: str) -> dict:
        return read_checkpoint(self.uri(name))

    def names(self) -> list[str]:
        """The files in the folder (not in its subfolders)."""
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True))
        except OSError as err:
            raise CheckpointError(f"cannot list checkpoints in {self.location}: {err}") from None
        return [info.base_name for info in infos if info.type == pafs.FileType.File]

    def step_files(self) -> list[tuple[int, str]]:
        """(step, name) of the periodic checkpoints, oldest first."""
        return sorted((int(m.group(1)), name) for name in self.names() if (m := STEP_FILE.match(name)))

    def last_modified(self) -> float | None:
        """When the newest periodic checkpoint was written (seconds since the epoch), if any."""
        files = self.step_files()
        if not files:
            return None
        return self.fs.get_file_info(self.path(files[-1][1])).mtime.timestamp()

    def latest(self) -> tuple[str, dict] | None:
        """The newest periodic checkpoint that passes its checksum, as (name, state); corrupted
        ones are skipped for the one before, with a warning naming them."""
        for _, name in reversed(self.step_files()):
            try:
                return name, self.read(name)
            except CheckpointError as err:
                log.warning("skipping checkpoint %s: %s", self.uri(name), err)
        return None

    def prune(self, keep: int) -> None:
        """Delete all but the newest ``keep`` periodic checkpoints (0 keeps all)."""
        if keep:
            for _, name in self.step_files()[:-keep]:
                _remove_quietly(self.fs, self.path(name))

    def set_aside(self, names: list[str], folder: str) -> None:
        """Move the checkpoints ``names`` into the subfolder ``folder``: nothing is deleted."""
        for name in names:
            self.fs.create_dir(self.path(folder), recursive=True)
            self.fs.move(self.path(name), self.path(f"{folder}/{name}"))


def probe_write(folder: str | Path, fs: pafs.FileSystem | None = None) -> None:
    """Create and delete a file in ``folder``: a real write, as root passes any permission check but
    not a read-only mount. Raises what stopped it: for a local folder (no ``fs``) Python's own
    ``OSError``, whose message reads plainly; else what ``fs`` raised. The file's name carries the
    process id, so that two processes probing one folder (an evaluation beside a run) cannot
    delete each other's."""
    name = f".distmeta-write-probe-{os.getpid()}"
    if fs is None:
        probe = Path(folder) / name
        probe.write_bytes(b"ok")
        probe.unlink()
        return
    path = f"{str(folder).rstrip('/')}/{name}"
    with fs.open_output_stream(path) as f:
        f.write(b"ok")
    fs.delete_file(path)


def join_location(location: str, name: str) -> str:
    """``location``/``name`` for a path or a URI; a URI's query (``?endpoint_override=...``, which
    pyarrow reads) stays at the end."""
    base, sep, query = location.partition("?") if "://" in location else (location, "", "")
    return f"{base.rstrip('/')}/{name}{sep}{query}"


def split_location(location: str) -> tuple[str, str]:
    """(folder, file name) of a checkpoint's path or URI; the inverse of ``join_location``."""
    base, sep, query = location.partition("?") if "://" in location else (location, "", "")
    folder, _, name = base.rpartition("/")
    return f"{folder or '.'}{sep}{query}", name


def filesystem(location: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path in it) for a local path or a pyarrow.fs URI."""
    if "://" not in location:
        return pafs.LocalFileSystem(), os.path.abspath(location)
    try:
        return pafs.FileSystem.from_uri(location)
    except Exception as err:
        raise CheckpointError(
            f"checkpoint location {location!r} is not a filesystem pyarrow can open ({err}); "
            "use a local path or a URI such as file:///abs/path, s3://bucket/prefix or gs://bucket/prefix"
        ) from None


def _write_local(tmp: str, final: str, data: bytes) -> None:
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    directory = os.open(os.path.dirname(final), os.O_RDONLY)
    try:  # the rename itself survives a power cut only once the folder is synced
        os.fsync(directory)
    finally:
        os.close(directory)


def _remove_quietly(fs: pafs.FileSystem, path: str) -> None:
    with contextlib.suppress(OSError):
        fs.delete_file(path)


def read_checkpoint(location: str | Path) -> dict:
    """The state stored at ``location`` (a path or URI), checksum verified. Nothing in the file is
    executed: see ``distmeta.tensorfile``."""
    return parse_checkpoint(location, read_bytes(location))


def read_bytes(location: str | Path) -> bytes:
    """The file at ``location`` as it is, or a ``CheckpointError`` naming why it cannot be read."""
    location = str(location)
    fs, path = filesystem(location)
    try:
        with fs.open_input_file(path) as f:
            return f.read()
    except FileNotFoundError:
        raise CheckpointError(
            f"checkpoint {location} does not exist (runs write them under <logdir>/<run>/checkpoints/)"
        ) from None
    except OSError as err:
        raise CheckpointError(f"cannot read checkpoint {location}: {err}") from None


def parse_checkpoint(location: str | Path, data: bytes) -> dict:
    """The state in ``data``, the bytes of the file at ``location``, checksum verified."""
    location = str(location)
    if data.startswith(PICKLE_MAGIC):
        raise CheckpointError(
            f"checkpoint {location} is in distmeta's earlier pickle-based format, which is not read because "
            "unpickling a file can run code. If you trust where it came from, convert it once: "
            f"`distmeta checkpoint convert {location}` (it reads the file with PyTorch's weights-only loader, "
            "which refuses anything but tensors, arrays and plain data; the original is kept as .pickle)"
        )
    try:
        state = tensorfile.loads(data)
    except tensorfile.TensorFileError as err:
        raise CheckpointError(f"checkpoint {location} cannot be read: {err}") from None
    if not isinstance(state, dict) or "params" not in state or "config" not in state:
        raise CheckpointError(f"{location} is not a distmeta checkpoint (no params/config entries)")
    if not isinstance(state["params"], torch.Tensor) or state["params"].dim() != 1:
        raise CheckpointError(f"{location} is not a distmeta checkpoint (params is not a flat tensor)")
    if state["params"].dtype not in (torch.float32, torch.float64):  # what training writes (train.dtype)
        raise CheckpointError(
            f"{location} is not a distmeta checkpoint (params are {state['params'].dtype}, not float32 or float64)"
        )
    return state


def convert_legacy(location: str | Path, out: str | Path | None = None) -> str:
    """Rewrite a checkpoint of the pickle-based format (distmeta 0.1, format 2) as a tensor file, at
    ``out`` or in its place (the old file kept beside it as ``NAME.pickle``); returns where. Only
    PyTorch's weights-only unpickler reads it, allowed the numpy names of arrays and scalars that
    the old RNG state and scores need, so even a hostile file runs nothing; the old checksum is verified too."""
    location = str(location)
    fs, path = filesystem(location)
    try:
        with fs.open_input_file(path) as f:
            data = f.read()
    except OSError as err:
        raise CheckpointError(f"cannot read checkpoint {location}: {err}") from None
    if not data.startswith(PICKLE_MAGIC):
        raise CheckpointError(f"{location} is not a checkpoint of the earlier pickle-based format")
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            if isinstance(state, dict) and "distmeta_checkpoint" in state:
                payload = state.get("payload", b"")
                if hashlib.sha256(payload).hexdigest() != state.get("sha256"):
                    raise CheckpointError(f"{location} fails its checksum: it was altered or written partly")
                state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        raise CheckpointError(
            f"{location} is not converted: it holds more than tensors and plain data, or is damaged "
            f"({str(err).splitlines()[0]})"
        ) from None
    if not isinstance(state, dict) or "params" not in state or "config" not in state:
        raise CheckpointError(f"{location} is not a distmeta checkpoint (no params/config entries)")
    if out is None:
        with fs.open_output_stream(f"{path}.pickle") as f:  # nothing is lost: the original stays beside it
            f.write(data)
    folder, name = split_location(str(out or location))
    return CheckpointStore(folder).write(name, state)


EXPORTED = ("params", "step", "config", "code_version", "distmeta_version", "trained_by", "validation")


def export_checkpoint(location: str | Path, out: str | Path) -> str:
    """Write the trained parameters of the checkpoint at ``location`` as a small, self-contained file at
    ``out`` (the zoo's format): the parameters, the step, the config, the code that trained them
    (``trained_by``) and this version, which wrote the file (an older one refuses it as newer), and
    ``best.pt``'s validation score; checksummed like every checkpoint, without the optimizer's state
    or the task stream's cursor, so it adapts, evaluates and initialises (``train.init_from``) but
    does not resume. The transfer baseline's head over its training classes, which its tests
    replace, is left out (``evaluate.without_training_head``): its export adapts and evaluates, and
    to continue its training, initialise from the run's own checkpoint. Returns where it is."""
    from distmeta.evaluate import without_training_head  # here: evaluation imports the runtime, which imports us

    state = read_checkpoint(location)
    state["params"] = torch.from_numpy(
        without_training_head(config_from_dict(state["config"]), state["params"].numpy())
    )
    state["trained_by"] = state.get("trained_by", state.get("code_version", "unknown"))
    state |= {"code_version": code_version(), "distmeta_version": distmeta.__version__}
    folder, name = split_location(str(out))
    store = CheckpointStore(folder)
    if store.fs.get_file_info(store.path(name)).type != pafs.FileType.NotFound:
        raise CheckpointError(f"{out} exists: export to a new name (nothing is overwritten)")
    return store.write(name, {key: state[key] for key in EXPORTED if key in state})


def _numpy_globals() -> list:
    """What pickles of numpy arrays and scalars (the old RNG state, evaluation scores) name."""
    try:
        from numpy._core.multiarray import _reconstruct, scalar
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct, scalar
    dtypes = [type(np.dtype(t)) for t in (np.uint32, np.int64, np.float32, np.float64, np.bool_)]
    return [np.ndarray, np.dtype, _reconstruct, scalar, *dtypes]


def load_checkpoint(location: str | Path) -> tuple[Config, np.ndarray, dict]:
    """(config, flat meta-parameters, the whole checkpoint)."""
    state = read_checkpoint(location)
    return config_from_dict(state["config"]), state["params"].numpy(), state


def checkpoint_record(cfg: Config, params: torch.Tensor, step: int) -> dict:
    """What every checkpoint holds, a training one, ``final.pt`` and ``best.pt`` alike: the flat
    meta-parameters, the step, the run's config and the code that wrote it. A training checkpoint
    adds the meta-optimizer's state (``MetaOptimizer.state``: the optimizer, the task stream's
    cursor, the RNGs, the rejected steps; ``checkpoint_state`` joins the shards'), ``best.pt`` its
    ``validation``."""
    return {
        "params": params,
        "step": step,
        "config": cfg.to_dict(),
        "code_version": code_version(),
        "distmeta_version": distmeta.__version__,
    }


@functools.cache
def code_version() -> str:
    """distmeta's version, with the git commit (and ``+dirty``) when run from a checkout. Cached:
    ``train`` asks once as it starts, so every checkpoint of a run names the code the run started
    with, not a commit made while it ran."""
    commit = git_commit(Path(distmeta.__file__).resolve().parent)
    return f"{distmeta.__version__} ({commit})" if commit else distmeta.__version__


def git_commit(package: Path) -> str:
    """The commit of the checkout holding ``package``, ``+dirty`` when the package's own files differ
    from it (a run folder inside the checkout, whose checkpoints change as the run goes, does not
    count); "" outside a checkout or without git."""
    git = ["git", "--no-optional-locks", "-C", str(package)]  # no index refresh: a commit beside us is not blocked

    def ask(*command: str) -> str | None:
        try:
            return subprocess.run([*git, *command], capture_output=True, text=True, timeout=5, check=True).stdout
        except (OSError, subprocess.SubprocessError):
            return None

    commit = (ask("rev-parse", "--short=12", "HEAD") or "").strip()
    if not commit:
        return ""
    changed = ask("status", "--porcelain", "--", ".")
    return commit if changed == "" else f"{commit}+dirty"  # unknown (git failed) counts as changed


def version_key(version: str) -> tuple[int, ...]:
    """Release numbers, a suffix's digits left out ("0.3.0rc1": (0, 3, 0), not (0, 3, 1)), for
    comparing the version that wrote a file with this one."""
    parts = version.split()[0].split(".")[:3] if version.strip() else []
    return tuple(int(match.group()) if (match := re.match(r"\d+", part)) else 0 for part in parts)


def writer_version(state: dict) -> str:
    """The distmeta version that wrote a checkpoint."""
    return str(state.get("distmeta_version", "an unknown version"))


def resumable(state: dict) -> bool:
    """Whether a run continues from this checkpoint: it holds the meta-optimizer's state (step
    files and final.pt do; best.pt and exports hold parameters only)."""
    return "optimizer" in state


def checkpoint_location(cfg: Config, run_dir: Path) -> str:
    """The run's checkpoint folder: <run>/checkpoints, or <train.checkpoint_dir>/<run name>."""
    root = cfg.train.checkpoint_dir
    return join_location(root, run_dir.name) if root else str(run_dir / "checkpoints")


class BestCheckpoint:
    """Keeps ``best.pt``: the parameters that scored best on the validation split so far, judged on
    the first evaluation shots after the inner steps they were trained for (``algorithm.inner_steps``
    when evaluated, else the most evaluated): fewest diverged tasks first (a mean over the surviving
    tasks flatters a snapshot where some blew up), then accuracy or return up, MSE down. On a tie the
    earlier snapshot stays. A resumed run competes with its earlier part's best only under the same
    protocol (``eval.*`` and ``train.eval_tasks`` may change on resume: scores over other episodes
    are not compared); under another, the earlier one is kept as ``best-<tag>-<tasks>tasks-step<S>.pt``."""

    NAME = "best.pt"

    def __init__(self, cfg: Config, store: CheckpointStore):
        self.cfg, self.store = cfg, store
        self.location = store.uri(self.NAME)
        self.row: EvalRow | None = None
        self.step, self.protocol = 0, None
        try:  # a resumed run competes with the best of its earlier part
            state = store.read(self.NAME)
            self.row, self.step = EvalRow(**state["validation"]["row"]), state["step"]
            self.protocol = state["validation"].get("protocol")  # None: written before protocols were recorded
        except (CheckpointError, KeyError, TypeError):
            pass

    def _protocol(self, row: EvalRow) -> list:
        """What makes two validation scores comparable: the row (metric, ways, shots, steps), its
        task count, what chooses and scores the episodes, and what counts as diverged (the first
        thing ranked). Appended last, as a best.pt of the earlier, shorter list still compares."""
        e = self.cfg.eval
        return [row.tag, row.tasks, e.seed, e.queries, e.inner_batch_size, e.transductive, e.divergence_factor]

    def offer(self, step: int, params: np.ndarray, rows: list[EvalRow]) -> None:
        candidates = [r for r in rows if r.shots == rows[0].shots]
        trained = [r for r in candidates if r.steps == self.cfg.algorithm.inner_steps]
        row = trained[0] if trained else max(candidates, key=lambda r: r.steps)
        if math.isnan(row.mean):  # no task scored; a diverged one (an infinite mean) still ranks
            return
        protocol = self._protocol(row)
        # a best.pt from before protocols were recorded: its row and task count alone
        earlier = self.protocol or ([self.row.tag, self.row.tasks] if self.row else protocol)
        if self.row is not None and earlier != protocol[: len(earlier)]:
            kept = f"best-{self.row.tag}-{self.row.tasks}tasks-step{self.step}.pt"
            self.store.write(kept, self.store.read(self.NAME))
            print(
                f"validation is now {row.tag} over {row.tasks} tasks (eval.seed={protocol[2]}), not the earlier "
                f"{self.row.tag} over {self.row.tasks}: best.pt starts afresh (the earlier best is kept as {kept})",
                flush=True,
            )
            self.row = None
        if self.row is not None and _rank(row) >= _rank(self.row):
            return
        self.row, self.step, self.protocol = row, step, protocol
        state = checkpoint_record(self.cfg, torch.from_numpy(params), step) | {
            "validation": {
                "split": "val",
                "tag": row.tag,
                "mean": row.mean,
                "ci95": row.ci95,
                "tasks": row.tasks,
                "row": dataclasses.asdict(row),
                "protocol": protocol,
            },
        }
        self.store.write(self.NAME, state)


def _rank(row: EvalRow) -> tuple[int, float]:
    """Lower is better."""
    return row.diverged, -row.mean if HIGHER_IS_BETTER[row.metric] else row.mean
