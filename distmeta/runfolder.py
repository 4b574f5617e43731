"""A run folder is owned by one run at a time.

Two runs writing one folder would overwrite each other's checkpoints and mix their TensorBoard
events, and a restarted parameter server in either would load the other's checkpoint. A run
therefore holds an exclusive ``flock`` on ``<run>/.distmeta-run.lock`` from before it touches the
folder until it ends; the operating system releases it when the process dies, so a crashed run
leaves no stale lock (docs/reliability.md, the row "two runs in one run folder"). A run that ends
before writing anything (Ray did not start, say) removes the folder it created, so a typo leaves no
empty run folders behind.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from distmeta.config import ConfigError

LOCK_FILE = ".distmeta-run.lock"

# Run folders this process owns -> (the lock file's descriptor, whether this claim created the
# folder). flock is per open file, so a second claim from this process (prepare_resume, then train)
# must reuse the first rather than lock again.
_OWNED: dict[str, tuple[int, bool]] = {}


def claim(run_dir: Path) -> None:
    """Own ``run_dir`` for this process until ``release``; refuses at once if another process
    owns it, naming that process."""
    key = os.path.abspath(run_dir)
    if key in _OWNED:
        return
    created = not Path(run_dir).exists()
    while True:
        fd = _locked(Path(run_dir))
        # The holder of a folder it created removes the lock file when it ends with nothing written,
        # so a lock won on a file since unlinked is no lock: open the new file and try again.
        if _same_file(fd, Path(run_dir) / LOCK_FILE):
            break
        os.close(fd)
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(holder | {"command": " ".join(sys.argv)}).encode(), 0)
    _OWNED[key] = (fd, created)


def _locked(run_dir: Path) -> int:
    """A descriptor of ``run_dir``'s lock file holding its exclusive lock; refuses at once if another
    process holds it."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise ConfigError(f"cannot write the run's logs to {run_dir} ({err}); choose a writable --logdir") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_holder(fd)
        os.close(fd)
        raise ConfigError(
            f"run folder {run_dir} is in use by another run ({holder}): two runs in one folder would overwrite "
            "each other's checkpoints. Wait for it to end, or give this run another run_name"
        ) from None
    except OSError as err:  # a filesystem without locks (some network mounts)
        os.close(fd)
        raise ConfigError(f"cannot lock run folder {run_dir} ({err}); choose a --logdir on a local disk") from None
    return fd


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def release(run_dir: Path) -> None:
    """Give up ``run_dir`` (closing the descriptor drops the lock). A folder this claim created and
    nothing was written to (its lock file and empty folders only) goes too; the lock file goes
    while still locked, and ``claim`` checks that the file it locked is still the folder's."""
    fd, created = _OWNED.pop(os.path.abspath(run_dir), (None, False))
    if fd is None:
        return
    try:
        if created and _holds_nothing(Path(run_dir)):
            (Path(run_dir) / LOCK_FILE).unlink()
            for folder in sorted(Path(run_dir).rglob("*"), reverse=True):  # deepest first
                folder.rmdir()
            Path(run_dir).rmdir()
    except OSError:  # written to meanwhile, or not ours to remove: leave what is there
        pass
    finally:
        os.close(fd)


def _holds_nothing(run_dir: Path) -> bool:
    return all(p.is_dir() or (p.name == LOCK_FILE and p.parent == run_dir) for p in run_dir.rglob("*"))


def _read_holder(fd: int) -> str:
    try:
        holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {holder['pid']} on {holder['host']}, started {holder['started']}: {holder['command']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not yet said which"
