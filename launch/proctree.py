"""Processes of a job as Linux sees them: descendants found by walking ``/proc``, and parent-death signals.

torch's agent starts its workers in sessions of their own, so a signal to the
agent's process group does not reach them: stopping a node for good means
signalling every descendant of the process the launcher started.
"""

from __future__ import annotations

import os
import signal
from typing import Callable

from distcomp.linux import PR_SET_CHILD_SUBREAPER, PR_SET_PDEATHSIG, prctl


def _parents() -> dict[int, int]:
    """``pid -> parent pid`` of every process visible now."""
    out: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue  # it exited while we looked
        # The command name (field 2) may hold spaces and parentheses: the fields after it follow the last ')'.
        out[int(entry)] = int(stat[stat.rindex(b")") + 2:].split()[1])
    return out


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children first), by the parent links in ``/proc``."""
    children: dict[int, list[int]] = {}
    for child, parent in _parents().items():
        children.setdefault(parent, []).append(child)
    out: list[int] = []
    todo = list(children.get(pid, []))
    while todo:
        child = todo.pop(0)
        out.append(child)
        todo += children.get(child, [])
    return out


def kill_tree(pid: int, signum: int = signal.SIGKILL, *, include_root: bool = True) -> list[int]:
    """Send ``signum`` to ``pid`` and every descendant (found before the first signal); the pids signalled."""
    pids = ([pid] if include_root else []) + descendants(pid)
    for p in pids:
        try:
            os.kill(p, signum)
        except (ProcessLookupError, PermissionError):
            pass
    return pids


def become_subreaper() -> None:
    """Adopt this process's orphaned descendants (so :func:`descendants` still finds a dead agent's workers)."""
    prctl(PR_SET_CHILD_SUBREAPER, 1)


def die_with_parent(signum: int) -> Callable[[], None]:
    """A ``preexec_fn`` that makes the child receive ``signum`` when the process that started it dies."""
    parent = os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, signum)
        if os.getppid() != parent:  # the parent died before prctl took effect: nobody would signal us
            os.kill(os.getpid(), signum)

    return preexec
