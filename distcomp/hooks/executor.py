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

Teardown order matters at interpreter exit. After every collective, a gloo
worker thread drops its references to the tensors it moved; for tensors that
Python created, torch 2.13 then takes the GIL (the tensor's Python object is
released when the last C++ reference but one goes). Once the interpreter has
begun finalizing, CPython ends any thread that asks for the GIL with
``pthread_exit``, whose unwinding reaches a ``noexcept`` destructor: the process
aborts with "terminate called without an active exception". The worker's
process group must therefore be destroyed, and its gloo threads joined, while
the interpreter is still whole. :meth:`WorkerExecutor.shutdown` stops the thread,
then destroys the group; every worker not shut down by then is shut down by an
exit handler, whether its owner was closed, dropped, or is still alive.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import logging
from collections.abc import Callable

import torch
import torch.distributed as dist

logger = logging.getLogger("distcomp")


class InlineExecutor:
    """Runs each job immediately on ``group`` (None: the default group); the returned future is already complete."""

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group

    def submit(self, job: Callable[[], torch.Tensor]) -> torch.futures.Future:
        fut: torch.futures.Future = torch.futures.Future()
        try:
            fut.set_result(job())
        except BaseException as exc:  # noqa: BLE001 - DDP re-raises it from backward()
            fut.set_exception(exc)
        return fut

    def shutdown(self) -> None:
        """Nothing to stop: the group belongs to the caller."""


class WorkerExecutor:
    """Runs jobs in submission order on one background thread, which talks on ``group``.

    The executor owns ``group``: :meth:`shutdown` destroys it.
    """

    def __init__(self, group: dist.ProcessGroup, name: str = "distcomp-comm") -> None:
        self.group: dist.ProcessGroup | None = group
        # torch's intra-op thread count is per thread: a fresh thread would use every core, so its first matrix
        # products (PowerSGD's, right after a resume) would round differently from the caller's.
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix=name,
            initializer=torch.set_num_threads,
            initargs=(torch.get_num_threads(),),
        )
        _OPEN.add(self)

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
        """Finish the queued jobs, stop the thread, then destroy the group; calling it again does nothing."""
        _OPEN.discard(self)
        self._pool.shutdown(wait=True)
        group, self.group = self.group, None
        if group is not None:
            release_group(group)


# Workers not shut down yet. Strong references: a hook state the user dropped
# without closing it leaves its group in torch's registry, alive until exit,
# so its worker must still be found and shut down then.
_OPEN: set[WorkerExecutor] = set()


@atexit.register
def _shutdown_open_workers() -> None:
    # Exit handlers run before finalization starts, so gloo threads can still
    # take the GIL while their group is torn down. distcomp registers this after
    # importing torch, so it runs before any exit handler of torch's.
    for worker in list(_OPEN):
        try:
            worker.shutdown()
        except Exception:  # noqa: BLE001 - one failed teardown must not stop the others
            logger.exception("shutting down distcomp's communication worker at exit failed")


def release_group(group: dist.ProcessGroup) -> None:
    """Take ``group`` out of torch's registry if it is still there; the caller then drops its last reference.

    Dropping the last reference is what destroys the group and joins its gloo
    threads (torch releases the GIL for that). ``dist.destroy_process_group()``
    without an argument empties the registry, the worker's group included, after
    which destroying the group again would raise.
    """
    if not dist.is_initialized():
        return
    try:
        dist.destroy_process_group(group)
    except ValueError:
        logger.debug("the worker's process group was already destroyed")
