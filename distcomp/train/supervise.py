"""The supervisor of the local ranks of ``distcomp train``: it stops them on a signal and blames the right one.

When one rank fails, its peers fail too at their next collective ("Connection reset
by peer") and all of it reaches the supervisor within milliseconds, in any order.
The supervisor collects what comes within a second and reports the root cause:
a rank's own error first, then a rank that died without a word (a signal such as
the OOM killer's SIGKILL, or an exit code), and a peer's connection error last.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path

from distcomp.train.stop import STOP_SIGNALS, StopRequest, exit_code, signal_name

logger = logging.getLogger("distcomp.train")

_PEER_ERROR = re.compile(r"connection (reset|closed|refused)|broken pipe|ECONNRESET|EPIPE|timed? ?out", re.IGNORECASE)
"""What a rank reports when another rank died or hung: a consequence, not a cause."""
_STOP_CODES = {exit_code(s) for s in STOP_SIGNALS}


@dataclass(frozen=True)
class Failure:
    """One rank's failure as the supervisor learned it."""

    rank: int
    message: str
    traceback: str
    at: float
    """``time.time()`` when the rank caught the error, or when the supervisor saw it die."""
    reported: bool
    """False when the rank died without a report (a signal or a bare exit code)."""

    @property
    def tier(self) -> int:
        """0: a rank's own error, 1: a silent death, 2: a peer's connection error or timeout (likely a consequence)."""
        if not self.reported:
            return 1
        return 2 if _PEER_ERROR.search(self.message) else 0


def supervise(procs: Sequence[BaseProcess], reports: list[Connection], stop: StopRequest, grace_s: float) -> int:
    """Wait for the ranks: stop them on a signal, or kill them all on the first failure. The exit code."""
    with _signal_wakeup() as woken:
        return _watch(procs, dict(enumerate(reports)), stop, grace_s, woken)


def _watch(
    procs: Sequence[BaseProcess], open_reports: dict[int, Connection], stop: StopRequest, grace_s: float, woken: int
) -> int:
    oom_start = oom_kills()
    failures: dict[int, Failure] = {}
    deadline: float | None = None
    while True:
        if stop.count >= 2:
            return _killed(procs, stop, "killed")
        if deadline is None and stop.signal():
            deadline = time.monotonic() + grace_s
            name = signal_name(stop.signal())
            sys.stderr.write(
                f"\n[distcomp] {name}: stopping after the current step (within dist.stop_grace_s = "
                f"{grace_s:g} s; {name} again to kill at once)\n"
            )
        _collect(procs, open_reports, failures, stopping=deadline is not None)
        if failures:
            return _fail(procs, open_reports, failures, oom_start)
        live = [p.sentinel for p in procs if p.exitcode is None]
        if not live:
            return _finished(procs, stop)
        if deadline is not None and time.monotonic() > deadline:
            return _killed(
                procs,
                stop,
                f"the ranks did not stop within dist.stop_grace_s = {grace_s:g} s; "
                "killed them (no checkpoint or summary for this step)",
            )
        if woken in wait(live + list(open_reports.values()) + [woken], timeout=0.2):
            os.read(woken, 512)


@contextlib.contextmanager
def _signal_wakeup() -> Iterator[int]:
    """A descriptor that becomes readable when a signal arrives, so the loop announces a stop at once."""
    read, write = os.pipe()
    os.set_blocking(read, False)
    os.set_blocking(write, False)
    old = signal.set_wakeup_fd(write)
    try:
        yield read
    finally:
        signal.set_wakeup_fd(old)
        os.close(read)
        os.close(write)


def _collect(
    procs: Sequence[BaseProcess], reports: dict[int, Connection], failures: dict[int, Failure], stopping: bool
) -> None:
    """Add the reports that arrived and the ranks that died without one; closed pipes leave ``reports``."""
    for rank, conn in list(reports.items()):
        try:
            if conn.poll():
                sender, message, trace, at = conn.recv()  # what the rank's report sends (train/launch.py)
                failures.setdefault(rank, Failure(sender, message, trace, at, reported=True))
        except (EOFError, OSError):
            del reports[rank]  # exited: a report, if any, was read before the end of the pipe
    for rank, p in enumerate(procs):
        code = p.exitcode
        if rank in failures or rank in reports or code in (None, 0) or code in _STOP_CODES:
            continue
        if stopping and code is not None and -code in STOP_SIGNALS:
            continue  # a second signal reached the rank first: the loop kills the rest
        failures[rank] = Failure(rank, _death(code), "", time.time(), reported=False)


def _fail(
    procs: Sequence[BaseProcess],
    reports: dict[int, Connection],
    failures: dict[int, Failure],
    oom_start: int | None,
    window_s: float = 1.0,
) -> int:
    """Gather what else fails within ``window_s``, report the root cause, kill every rank."""
    end = time.monotonic() + window_s
    while (left := end - time.monotonic()) > 0 and len(failures) < len(procs):
        wait([p.sentinel for p in procs if p.exitcode is None] + list(reports.values()), timeout=min(left, 0.05))
        _collect(procs, reports, failures, stopping=False)
    cause = min(failures.values(), key=lambda f: (f.tier, f.at))
    _kill(procs)
    what = f"{cause.message}{_oom_hint(cause, oom_start)}" if not cause.reported else f"failed: {cause.message}"
    tb = f"{cause.traceback}\n" if cause.traceback else ""
    sys.stderr.write(f"{tb}[distcomp] rank {cause.rank} {what}\n[distcomp] the other ranks were stopped\n")
    return 1


def _death(code: int) -> str:
    if code < 0:
        return f"was killed by {signal_name(-code)} (no error report)"
    return f"exited with code {code} without an error report"


def _oom_hint(cause: Failure, oom_start: int | None) -> str:
    if "SIGKILL" not in cause.message:
        return ""
    now = oom_kills()
    if oom_start is not None and now is not None and now > oom_start:
        return (
            f" -- likely out of memory: the memory cgroup's oom_kill count went from {oom_start} to {now} "
            "during the job; lower data.batch_size or model size, or give the job more memory"
        )
    return " -- SIGKILL comes from kill -9 or from the out-of-memory killer (see dmesg)"


def _finished(procs: Sequence[BaseProcess], stop: StopRequest) -> int:
    if stop.signal():
        return exit_code(stop.signal())
    stopped = [p.exitcode for p in procs if p.exitcode in _STOP_CODES]
    return max(stopped) if stopped else 0  # 0: every rank ended with 0


def _killed(procs: Sequence[BaseProcess], stop: StopRequest, why: str) -> int:
    _kill(procs)
    sys.stderr.write(f"\n[distcomp] {why}\n")
    return exit_code(stop.signal())


def _kill(procs: Sequence[BaseProcess]) -> None:
    for p in procs:
        if p.is_alive():
            p.kill()
    for p in procs:
        p.join(5)


def oom_kills(files: list[Path] | None = None) -> int | None:
    """Processes the out-of-memory killer has killed in this process's memory cgroup so far; None: unknown.

    cgroup v2 counts them in ``memory.events``, cgroup v1 in ``memory.oom_control``
    (``oom_kill N`` in both).
    """
    for path in files if files is not None else _oom_files():
        try:
            lines = path.read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            key, _, value = line.partition(" ")
            if key == "oom_kill" and value.strip().isdigit():
                return int(value)
    return None


def _oom_files() -> list[Path]:
    """This process's own memory cgroup first (from /proc/self/cgroup), then the namespace's root."""
    root = Path("/sys/fs/cgroup")
    files = []
    try:
        entries = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        entries = []
    for entry in entries:
        _, controllers, rel = entry.split(":", 2)
        if controllers == "":
            files.append(root / rel.lstrip("/") / "memory.events")
        elif "memory" in controllers.split(","):
            files.append(root / "memory" / rel.lstrip("/") / "memory.oom_control")
    return files + [root / "memory.events", root / "memory" / "memory.oom_control"]
