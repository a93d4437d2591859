"""Stopping ``distcomp train`` on a signal, at any moment, without losing work.

SIGINT (Ctrl-C), SIGTERM (schedulers, container runtimes, preemptible clouds,
torchrun stopping its workers) and SIGHUP (a closed terminal or ssh session) are
stop requests, not exits: the ranks finish the step they are in, agree at that
step's all-reduce that one of them was asked to stop, write a checkpoint (when
checkpoints are on) and the summary, and exit with ``128 + signal``: 130 for
SIGINT, 143 for SIGTERM, 129 for SIGHUP, as a shell reports a command that such
a signal ended. A second signal kills at once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

from distcomp.launch.proctree import STOP_SIGNALS, exit_code, signal_name

logger = logging.getLogger("distcomp.train")


class StopRequest:
    """Which signal asked this process to stop; 0 while none did.

    The spawned ranks and their supervisor also share ``shared`` (a ``multiprocessing``
    ``RawValue('i')``): whoever receives a signal writes it there and every process of
    the job reads it at its next step. Plain shared memory, no lock and no signal, so a
    request can neither be missed nor kill a rank that is still starting.
    """

    def __init__(self, shared: Any | None = None) -> None:
        self.shared = shared
        self.local = 0
        self.count = 0
        """Signals this process received itself (a second one kills)."""

    def request(self, signum: int) -> None:
        """Record a stop signal (called from a signal handler: only plain assignments)."""
        self.count += 1
        self.local = self.local or signum
        if self.shared is not None and not self.shared.value:
            self.shared.value = signum

    def signal(self) -> int:
        """The signal that asked to stop, received here or by another process of the job; 0: none."""
        return self.local or (int(self.shared.value) if self.shared is not None else 0)


def handle_in_supervisor(stop: StopRequest) -> None:
    """Make every stop signal a request that the supervising loop acts on (no exception, no exit)."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, lambda s, frame: stop.request(s))


def handle_in_rank(stop: StopRequest, grace_s: float | None = None) -> None:
    """Make the first stop signal a request, and any later one the default action (death, even mid-collective).

    With ``grace_s`` (a rank that no supervisor watches), the rank also exits on its
    own when it has not stopped that many seconds after the request.
    """

    def on_signal(signum: int, frame: object) -> None:
        stop.request(signum)
        for other in STOP_SIGNALS:
            signal.signal(other, signal.SIG_DFL)

    for signum in STOP_SIGNALS:
        signal.signal(signum, on_signal)
    if grace_s is not None:
        _start_watchdog(grace_s)


def _start_watchdog(grace_s: float) -> None:
    """Bound the stop by ``grace_s`` from a thread that learns of signals through the wakeup fd.

    A Python signal handler runs only when the main thread runs Python: a rank blocked
    in a collective (its peer hung) would never get to start a timer itself.
    """
    read, write = os.pipe()
    os.set_blocking(write, False)
    signal.set_wakeup_fd(write, warn_on_full_buffer=False)
    threading.Thread(target=_watchdog, args=(read, grace_s), name="distcomp-stop-watchdog", daemon=True).start()


def _watchdog(read: int, grace_s: float) -> None:
    signum = _next_stop_signal(read, None)
    again = _next_stop_signal(read, grace_s)
    why = "a second signal" if again else f"this rank did not stop within dist.stop_grace_s = {grace_s:g} s"
    sys.stderr.write(f"[distcomp] {signal_name(signum)}: {why}; exiting without a checkpoint\n")
    sys.stderr.flush()
    os._exit(exit_code(signum))


def _next_stop_signal(read: int, timeout_s: float | None) -> int:
    """The next stop signal the wakeup fd reports within ``timeout_s`` (None: however long it takes); 0: none."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        if not select.select([read], [], [], left)[0]:
            return 0
        signum = os.read(read, 1)[0]
        if signum in STOP_SIGNALS:
            return signum


@contextlib.contextmanager
def signals_blocked() -> Iterator[None]:
    """Hold stop signals pending here, and in processes started meanwhile (the mask survives fork and exec).

    A spawned rank starts with them blocked and unblocks them (:func:`unblock`) once its
    handlers are in: a Ctrl-C during its start-up is then a stop request, not a
    KeyboardInterrupt traceback.
    """
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def unblock() -> None:
    """Deliver the stop signals held since start-up (to the handlers now installed)."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
