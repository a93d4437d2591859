"""Where a bucket's collectives run: inline in the hook, or on one FIFO worker thread.

Collectives must be issued in the same order on every rank. Launching them
from ``Future.then`` callbacks breaks that on gloo (callbacks run on gloo's own
threads), which is why torch's PowerSGD hook hangs with several buckets. Both
executors here issue every collective of a bucket from a single place, in
bucket order: :class:`InlineExecutor` on the autograd thread that calls the hook,
:class:`WorkerExecutor` on one dedicated thread per hook, so that communication
overlaps the rest of the backward pass. The worker talks on a process group of
its own, so DDP's own collectives on the autograd thread cannot interleave with
it differently on different ranks.
"""

from __future__ import annotations

import concurrent.futures
from typing import Callable

import torch


class InlineExecutor:
    """Runs each job immediately; the returned future is already complete."""

    def submit(self, job: Callable[[], torch.Tensor]) -> torch.futures.Future:
        fut: torch.futures.Future = torch.futures.Future()
        try:
            fut.set_result(job())
        except BaseException as exc:  # noqa: BLE001 - DDP re-raises it from backward()
            fut.set_exception(exc)
        return fut

    def shutdown(self) -> None:
        pass


class WorkerExecutor:
    """Runs jobs in submission order on one background thread."""

    def __init__(self, name: str = "distcomp-comm") -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    def submit(self, job: Callable[[], torch.Tensor]) -> torch.futures.Future:
        fut: torch.futures.Future = torch.futures.Future()

        def run() -> None:
            try:
                fut.set_result(job())
            except BaseException as exc:  # noqa: BLE001 - DDP re-raises it from backward()
                fut.set_exception(exc)

        self._pool.submit(run)
        return fut

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)
