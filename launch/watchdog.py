"""Run a node's agent and never outlive the launcher: ``python -m distcomp.launch.watchdog [--grace S] -- ARGV``.

Every node command of ``distcomp launch`` runs under this watchdog (on a remote
host, inside the ssh line). It starts ``ARGV`` (the torch agent) and stops it
when any of these happens:

* its stdin reaches end-of-file: the launcher keeps a pipe to it open and never
  writes it, so EOF means the launcher died (or the ssh connection dropped);
* its stdout hangs up (the terminal closed, or the connection behind it dropped);
* it receives SIGINT, SIGTERM or SIGHUP (the launcher, or a parent-death signal).

Stopping sends the agent SIGTERM (SIGINT when that is what arrived), waits
``--grace`` seconds, then SIGKILLs the agent and every descendant. The
watchdog adopts orphaned descendants (``PR_SET_CHILD_SUBREAPER``), so workers
whose agent died are still found; none is left behind when it exits. Its exit
status is the agent's (killed by signal N when the agent was).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from types import FrameType

from distcomp.launch.proctree import (
    STOP_SIGNALS,
    become_subreaper,
    descendants,
    die_with_parent,
    exit_code,
    kill_tree,
    signal_name,
)

logger = logging.getLogger("distcomp.launch.watchdog")
MODULE = "distcomp.launch.watchdog"
POLL_S = 0.1


class _Watch:
    """What the watchdog waits for: the agent's exit, or a reason to stop it."""

    def __init__(self, proc: subprocess.Popen, grace_s: float) -> None:
        self.proc = proc
        self.grace_s = grace_s
        self.reason: str | None = None
        self.deadline: float | None = None
        self.wake = threading.Event()

    def request_stop(self, reason: str, signum: int = signal.SIGTERM) -> None:
        """Ask the agent to stop (once); :meth:`tick` kills everything left after the grace period."""
        if self.reason is None:
            self.reason = reason
            self.deadline = time.monotonic() + self.grace_s
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signum)
        self.wake.set()

    def stop_on_signal(self, forwarded: int) -> Callable[[int, FrameType | None], None]:
        """A handler for :func:`signal.signal`: stop the agent with ``forwarded``, naming the signal that arrived."""

        def handler(signum: int, frame: FrameType | None) -> None:
            self.request_stop(signal_name(signum), forwarded)

        return handler

    def tick(self) -> None:
        """Kill the agent and its descendants once the grace period is over."""
        if self.deadline is not None and time.monotonic() >= self.deadline:
            logger.warning(
                "the agent did not stop within %g s after %s: killing it and its workers", self.grace_s, self.reason
            )
            kill_tree(self.proc.pid, signal.SIGKILL)
            self.deadline = None


def _watch_stdin(watch: _Watch) -> None:
    try:
        while os.read(0, 65536):
            pass
    except OSError:
        pass
    watch.request_stop("the launcher went away (stdin closed)")


def _stdout_hung_up(poller: select.poll | None) -> bool:
    if poller is None:
        return False
    return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))


def _stdout_poller() -> select.poll | None:
    try:
        poller = select.poll()
        poller.register(1, 0)  # no events asked for: poll still reports POLLERR/POLLHUP
        return poller
    except (OSError, ValueError):
        return None


def _reap_leftovers() -> None:
    """Kill and reap what the agent left behind (adopted orphans): nothing of the node outlives the watchdog."""
    for _ in range(50):
        left = descendants(os.getpid())
        if not left:
            return
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for pid in left:
            with contextlib.suppress(ChildProcessError):  # not ours to reap: its own parent will
                os.waitpid(pid, os.WNOHANG)
        time.sleep(0.02)


def run(argv: Sequence[str], grace_s: float, watch_stdin: bool = True) -> int:
    """Run ``argv`` under the watchdog; the agent's exit status (``-N``: killed by signal N)."""
    become_subreaper()
    # SIGTERM if the watchdog itself is SIGKILLed: the agent then stops its workers as on any SIGTERM.
    proc = subprocess.Popen(
        list(argv), stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=die_with_parent(signal.SIGTERM)
    )
    watch = _Watch(proc, grace_s)
    for signum in STOP_SIGNALS:
        # SIGHUP means the terminal or session is gone: the agent gets SIGTERM, like on any other stop.
        forwarded = signal.SIGINT if signum == signal.SIGINT else signal.SIGTERM
        signal.signal(signum, watch.stop_on_signal(forwarded))
    if watch_stdin:
        threading.Thread(target=_watch_stdin, args=(watch,), daemon=True).start()
    poller = _stdout_poller()
    while proc.poll() is None:
        if _stdout_hung_up(poller):
            poller = None
            watch.request_stop("stdout hung up")
        watch.tick()
        watch.wake.wait(POLL_S)
        watch.wake.clear()
    _reap_leftovers()
    return proc.returncode


def _exit_like(code: int) -> None:
    """Exit with ``code``; a negative one (killed by a signal) by that same signal, so callers see it as such."""
    sys.stdout.flush()
    if code < 0:
        if -code not in (signal.SIGKILL, signal.SIGSTOP):  # those two cannot be caught: no handler to undo
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
        code = exit_code(-code)
    sys.exit(code)


def watchdog_argv(python: str, argv: Sequence[str], grace_s: float, watch_stdin: bool = True) -> list[str]:
    """The command line that runs ``argv`` under the watchdog with ``python``."""
    head = [python, "-m", MODULE, "--grace", f"{grace_s:g}"]
    return [*head, *([] if watch_stdin else ["--ignore-stdin"]), "--", *argv]


def main(args: Sequence[str] | None = None) -> None:
    """``python -m distcomp.launch.watchdog``."""
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--grace",
        type=float,
        default=30.0,
        metavar="S",
        help="seconds the agent gets to stop before it and its workers are killed",
    )
    parser.add_argument(
        "--ignore-stdin",
        action="store_true",
        help="do not treat EOF on stdin as the launcher's death (where stdin is not forwarded)",
    )
    parser.add_argument("argv", nargs=argparse.REMAINDER)
    ns = parser.parse_args(args)
    argv = ns.argv[1:] if ns.argv[:1] == ["--"] else ns.argv
    if not argv:
        parser.error("no command to run (expected -- ARGV)")
    logging.basicConfig(format="[distcomp watchdog] %(message)s")
    _exit_like(run(argv, ns.grace, watch_stdin=not ns.ignore_stdin))


if __name__ == "__main__":
    main()
