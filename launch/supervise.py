"""Run the per-host commands and stand by them: prefixed output, the first failure stops the rest.

* Every command runs in its own process group; stopping a node sends SIGTERM to
  that group (the node's watchdog passes it on to the torchrun agent, which
  passes it on to its workers; an ssh client drops its connection, and the
  remote watchdog stops the agent) and, after ``stop_timeout_s``, SIGKILL to
  the command and every local descendant.
* A node whose command exits non-zero ends a fixed-size job: the other nodes are
  stopped and the launcher exits with ``10 + i`` for node ``i`` (see
  :func:`~distcomp.launch.errors.node_failed_code`). An elastic job
  (``--nnodes MIN:MAX``) lets torch's agents carry on without that node and
  succeeds when any node finishes the job.
* Ctrl-C, SIGTERM or SIGHUP (the terminal or ssh session closed) is passed on
  to every node; a second one kills them.
* Nothing outlives the launcher, even when it is SIGKILLed: each node command
  gets SIGTERM when the launcher dies (``PR_SET_PDEATHSIG``), and a node marked
  :attr:`~distcomp.launch.spec.Command.lifeline` reads a pipe from the launcher
  that only its death closes (see :mod:`distcomp.launch.watchdog`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import IO

from distcomp.launch.environment import current_env
from distcomp.launch.errors import EXIT_INTERRUPTED, LaunchError, node_failed_code
from distcomp.launch.proctree import STOP_SIGNALS, describe_exit, die_with_parent, kill_tree
from distcomp.launch.spec import Command

logger = logging.getLogger("distcomp.launch")
POLL_S = 0.2


class _Interrupted(Exception):
    """SIGINT, SIGTERM or SIGHUP reached the launcher."""


@dataclass
class _Node:
    index: int
    command: Command
    proc: subprocess.Popen
    threads: list[threading.Thread] = field(default_factory=list)
    stopped: bool = False
    """True once the launcher asked it to stop (its exit code is then not a failure of its own)."""


def _pump(stream: IO[str], sink: IO[str], label: str) -> None:
    for line in stream:
        try:
            sink.write(f"{label}: {line}")
            sink.flush()
        except OSError:
            pass  # the terminal is gone (SIGHUP): keep draining, or the node would block on a full pipe
    stream.close()


def _say(text: str) -> None:
    """Write to the launcher's stderr, which may be a terminal that has just gone away."""
    try:
        sys.stderr.write(text)
        sys.stderr.flush()
    except OSError:
        pass


def _start(index: int, command: Command, prefix: bool) -> _Node:
    pipe = subprocess.PIPE if prefix else None
    stdin = subprocess.PIPE if command.lifeline else subprocess.DEVNULL
    try:
        proc = subprocess.Popen(
            command.argv,
            env=current_env(dict(command.env)),
            stdout=pipe,
            stderr=pipe,
            stdin=stdin,
            text=True,
            start_new_session=True,
            preexec_fn=die_with_parent(signal.SIGTERM),
        )
    except FileNotFoundError:
        raise LaunchError(f"`{command.argv[0]}` is not installed here (needed to start {command.label})") from None
    node = _Node(index, command, proc)
    if prefix:
        node.threads = [
            threading.Thread(target=_pump, args=(s, sink, command.label), daemon=True)
            for s, sink in ((proc.stdout, sys.stdout), (proc.stderr, sys.stderr))
        ]
        for t in node.threads:
            t.start()
    return node


def _signal(node: _Node, signum: int) -> None:
    if signum == signal.SIGKILL:
        kill_tree(node.proc.pid)  # the agent's workers run in sessions of their own: the group is not enough
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(node.proc.pid, signum)


def _stop(nodes: Sequence[_Node], timeout_s: float, signum: int = signal.SIGTERM) -> None:
    """Ask every running node to stop, then kill whatever is left after ``timeout_s``."""
    for n in nodes:
        if n.proc.poll() is None:
            n.stopped = True
            _signal(n, signum)
    deadline = time.monotonic() + timeout_s
    for n in nodes:
        try:
            n.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            logger.warning("node %d (%s) did not stop within %g s: killing it", n.index, n.command.label, timeout_s)
            _signal(n, signal.SIGKILL)
            n.proc.wait()


def run_nodes(commands: Sequence[Command], *, prefix_output: bool, stop_timeout_s: float, elastic: bool = False) -> int:
    """Start ``commands`` (node ``i`` is ``commands[i]``), wait, and return the launcher's exit code."""

    def interrupted(signum: int, frame: object) -> None:
        raise _Interrupted(signum)

    previous = {s: signal.signal(s, interrupted) for s in STOP_SIGNALS}
    nodes: list[_Node] = []
    try:
        for i, command in enumerate(commands):
            nodes.append(_start(i, command, prefix_output))
        return _watch(nodes, stop_timeout_s, elastic)
    except _Interrupted:
        _say("\n[distcomp launch] interrupted: stopping every node (again to kill)\n")
        try:
            _stop(nodes, stop_timeout_s, signal.SIGINT)
        except _Interrupted:
            _stop(nodes, 0.0, signal.SIGKILL)
        return EXIT_INTERRUPTED
    finally:
        _stop(nodes, 0.0, signal.SIGKILL)  # nothing outlives the launcher
        for n in nodes:
            for t in n.threads:
                t.join(5)
            if n.proc.stdin is not None:
                n.proc.stdin.close()
        for s, handler in previous.items():
            signal.signal(s, handler)


def _watch(nodes: list[_Node], stop_timeout_s: float, elastic: bool) -> int:
    failed: list[_Node] = []
    while True:
        for n in nodes:
            code = n.proc.poll()
            if code not in (None, 0) and n not in failed:
                failed.append(n)
                logger.error("node %d (%s) failed: %s", n.index, n.command.label, describe_exit(code))
        if failed and not elastic:
            return _fail(nodes, failed[0], stop_timeout_s)
        if all(n.proc.poll() is not None for n in nodes):
            if not failed or (elastic and any(n.proc.returncode == 0 for n in nodes)):
                return 0
            return node_failed_code(failed[0].index)
        time.sleep(POLL_S)


def _fail(nodes: list[_Node], first: _Node, stop_timeout_s: float) -> int:
    others = [n for n in nodes if n is not first and n.proc.poll() is None]
    if others:
        logger.error("stopping the other node(s): %s", ", ".join(f"{n.index} ({n.command.label})" for n in others))
    _stop(others, stop_timeout_s)
    for n in nodes:
        if n is not first:
            how = "stopped by the launcher" if n.stopped else "exited on its own"
            logger.error("node %d (%s): %s, %s", n.index, n.command.label, describe_exit(n.proc.returncode), how)
    code = node_failed_code(first.index)
    logger.error(
        "the job failed: node %d (%s) failed first (%s); launcher exit code %d",
        first.index,
        first.command.label,
        describe_exit(first.proc.returncode),
        code,
    )
    return code
