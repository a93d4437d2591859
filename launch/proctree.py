"""Processes of a job as Linux sees them: descendants found by walking ``/proc``, parent-death signals, exit statuses.

torch's agent starts its workers in sessions of their own, so a signal to the
agent's process group does not reach them: stopping a node for good means
signalling every descendant of the process the launcher started.

The launcher, its watchdog and the supervisor of ``distcomp train``'s local ranks
share what is here: the stop signals, how a process's end is named, and the
parent-death signal that keeps a child from outliving whoever started it.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable

from distcomp.linux import PR_SET_CHILD_SUBREAPER, PR_SET_PDEATHSIG, prctl

STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGHUP, signal.SIGINT, signal.SIGTERM)
"""Signals that stop a job in an orderly way (a second one kills); where processes got different ones, the last
listed wins."""


def signal_name(signum: int) -> str:
    """``SIGTERM`` for 15, and so on."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def exit_code(signum: int) -> int:
    """The exit status of a process that ``signum`` ended: 128 + its number, as a shell reports it."""
    return 128 + signum


def describe_exit(returncode: int) -> str:
    """``killed by SIGKILL`` for a ``Popen.returncode`` of -9, ``exit code 3`` for 3."""
    return f"killed by {signal_name(-returncode)}" if returncode < 0 else f"exit code {returncode}"


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
        out[int(entry)] = int(stat[stat.rindex(b")") + 2 :].split()[1])
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
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(p, signum)
    return pids


def become_subreaper() -> None:
    """Adopt this process's orphaned descendants (so :func:`descendants` still finds a dead agent's workers)."""
    prctl(PR_SET_CHILD_SUBREAPER, 1)


def die_with_parent(signum: int, parent: int | None = None) -> Callable[[], None]:
    """A function for the child to run first that makes it receive ``signum`` when ``parent`` dies.

    ``parent`` defaults to the process that calls this: make it there and pass it
    as ``preexec_fn``. A child started otherwise (``multiprocessing``) passes the
    pid its parent gave it and calls the result itself.
    """
    parent = os.getpid() if parent is None else parent

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, signum)
        if os.getppid() != parent:  # the parent died before prctl took effect: nobody would signal us
            os.kill(os.getpid(), signum)

    return preexec
