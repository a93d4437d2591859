"""A run directory belongs to one job, and a new run never destroys what an earlier one wrote.

* The job holds ``<log.dir>/<name>/distcomp.lock`` (and ``<root>/distcomp.lock``
  in each checkpoint root that ``checkpoint.dir`` puts elsewhere) with ``flock``
  for its whole life; the file records the holder (host, pid, start time,
  command line). A second job on the same folders is refused, naming the holder.
  The kernel drops the lock when the holder's process ends, however it ends, so
  a lock left by a dead job blocks nothing. The lock file is also the probe that
  the folder is writable.
* A fresh run (no ``--resume``, or ``--resume auto`` with nothing to resume) in a
  folder holding an earlier run's checkpoints is refused unless ``--overwrite``
  is given; then, and for an earlier run's other files (summary.json, TensorBoard
  events), everything is moved to ``previous/<UTC time>/`` in the same folder.
  Nothing is deleted.

The locks live in a :class:`JobScope`: ``distcomp train`` opens one around the
job; without one they are held until this process exits.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import logging
import os
import shlex
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

from distcomp.errors import ConfigError
from distcomp.train import checkpoint
from distcomp.train.config import TrainConfig

logger = logging.getLogger("distcomp.train")
LOCK_NAME = "distcomp.lock"
"""The lock file in a run directory (and in each checkpoint root set elsewhere)."""
PREVIOUS = "previous"
"""Where an earlier run's files go: ``<folder>/previous/<UTC time>/``."""


class JobScope:
    """The run-directory locks of one job and how it treats an earlier run's checkpoints."""

    def __init__(self, overwrite: bool = False) -> None:
        self.overwrite = overwrite
        """``--overwrite``: move an earlier run's checkpoints aside instead of refusing a fresh run."""
        self.locks = contextlib.ExitStack()

    def __enter__(self) -> JobScope:
        _SCOPES.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        _SCOPES.remove(self)
        self.locks.close()


_SCOPES: list[JobScope] = []
_PROCESS_SCOPE = JobScope()  # no scope open: locks live as long as this process


def prepare(cfg: TrainConfig, *, fresh: bool, nothing_to_resume: bool = False) -> None:
    """Lock the run's folders for this job; for a fresh run, move an earlier run's files aside.

    Raises :class:`ConfigError` (folder not writable, held by another job, or an
    earlier run's checkpoints without ``--overwrite``), releasing what it took.
    Under a launcher (RANK set) only rank 0 does this; the other ranks return at once.
    ``nothing_to_resume``: ``--resume auto`` found no complete checkpoint (the refusal then says so).
    """
    if os.environ.get("RANK", "0") != "0":
        return
    scope = _SCOPES[-1] if _SCOPES else _PROCESS_SCOPE
    if scope is _PROCESS_SCOPE:
        scope.locks.close()  # launch() is synchronous: an earlier job of this process without a scope has ended
    with contextlib.ExitStack() as taken:
        for folder, key in folders(cfg):
            taken.enter_context(_lock(folder, key))
        if fresh:
            _make_way(cfg, overwrite=scope.overwrite, nothing_to_resume=nothing_to_resume)
        scope.locks.enter_context(taken.pop_all())


def folders(cfg: TrainConfig) -> list[tuple[Path, str]]:
    """``(folder, config key)`` a job owns: its run directory, and checkpoint roots outside it."""
    run_dir = Path(cfg.log.dir) / cfg.name
    out = [(run_dir, "log.dir")]
    for spec in cfg.runs():
        root = checkpoint.run_root(cfg, spec)
        if not root.resolve().is_relative_to(run_dir.resolve()):
            out.append((root, "checkpoint.dir"))
    return out


@contextlib.contextmanager
def _lock(folder: Path, key: str) -> Iterator[None]:
    path = folder / LOCK_NAME
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise _unwritable(folder, key, exc) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(
                f"{folder} is in use by another distcomp train job ({_holder(path)}); wait for it to "
                f"end or stop it, or give this run another name (--set name=...)"
            ) from None
        try:
            _record_holder(fd)
        except OSError as exc:
            raise _unwritable(folder, key, exc) from None
        yield
    finally:
        os.close(fd)  # releases the lock


def _unwritable(folder: Path, key: str, exc: OSError) -> ConfigError:
    why = exc.strerror or str(exc)
    fix = "free space there" if exc.errno == errno.ENOSPC else "make it writable"
    return ConfigError(f"{key}: cannot write to {folder} ({why}); {fix}, or choose another folder (--set {key}=PATH)")


def _record_holder(fd: int) -> None:
    record = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "command": shlex.join(sys.argv),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
    os.fsync(fd)


def _holder(path: Path) -> str:
    try:
        h = json.loads(path.read_text())
        return f"host {h['host']}, pid {h['pid']}, started {h['started']}: {h['command']}"
    except (OSError, ValueError, KeyError, TypeError):
        return f"its holder is not recorded in {path} yet"


def _make_way(cfg: TrainConfig, *, overwrite: bool, nothing_to_resume: bool) -> None:
    """Refuse to start over an earlier run's checkpoints unless asked; move its files aside."""
    run_dir = Path(cfg.log.dir) / cfg.name
    found = earlier_checkpoints(cfg)
    if found and not overwrite:
        # After --resume auto found every checkpoint damaged, suggesting it again would send a restart loop round.
        way_on = (
            "none of them is complete (see the warnings above), so --resume auto cannot continue that run"
            if nothing_to_resume
            else "To continue that run: --resume auto"
        )
        raise ConfigError(
            f"{run_dir} holds checkpoints of an earlier run ({_describe(found)}). {way_on}; to start over: "
            f"--overwrite (its files are moved to {run_dir / PREVIOUS}/, nothing is deleted); to keep both: "
            f"another name (--set name={cfg.name}-2)"
        )
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    for folder, key in folders(cfg):
        try:
            moved = _move_aside(folder, stamp)
        except OSError as exc:
            raise _unwritable(folder, key, exc) from None
        if moved is not None:
            logger.info("an earlier run's files in %s were moved to %s", folder, moved)


def earlier_checkpoints(cfg: TrainConfig) -> list[Path]:
    """Complete checkpoints already in the run's folders (outside ``previous/``)."""
    found: list[Path] = []
    for folder, _ in folders(cfg):
        found += [
            p
            for p in folder.rglob("step_*")
            if p.is_dir() and not p.name.endswith(".tmp") and PREVIOUS not in p.relative_to(folder).parts
        ]
    return sorted(set(found))


def _describe(found: list[Path]) -> str:
    by_root: dict[Path, list[str]] = {}
    for p in found:
        by_root.setdefault(p.parent, []).append(p.name)
    return "; ".join(f"{root}: {len(names)} checkpoint(s), newest {max(names)}" for root, names in by_root.items())


def _move_aside(folder: Path, stamp: str) -> Path | None:
    """Move everything in ``folder`` but its lock and ``previous/`` to ``previous/<stamp>/``; where, or None."""
    entries = [p for p in folder.iterdir() if p.name not in (LOCK_NAME, PREVIOUS)]
    if not entries:
        return None
    dest = folder / PREVIOUS / stamp
    for n in range(2, 1000):
        if not dest.exists():
            break
        dest = folder / PREVIOUS / f"{stamp}-{n}"
    dest.mkdir(parents=True)
    for entry in entries:
        entry.rename(dest / entry.name)
    return dest
