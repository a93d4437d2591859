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

:class:`PipelinedExecutor` keeps that order but moves the waits: a bucket that
has issued its last collective (a two-phase bucket's all-gather) hands the
thread on to the next bucket while its data is on the wire, so bucket i+1's
all-to-all overlaps bucket i's all-gather. Only one bucket runs at a time (it
holds the *baton*); bucket i+1 starts only after bucket i issued its last
collective, so every rank issues the collectives exactly as one thread would;
and the code after a wait runs in bucket order, so the compressor's state is
updated exactly as without pipelining.

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

On CUDA a worker runs its jobs on a stream of its own, after the work the
submitting thread had queued, and completes futures that carry the device, so
that DDP's reducer waits for the worker's stream (:mod:`distcomp.streams`).
"""

from __future__ import annotations

import atexit
import concurrent.futures
import logging
import threading
from collections.abc import Callable

import torch
import torch.distributed as dist

from distcomp.streams import Handoff, WorkerStreams, new_future
from distcomp.workspace import Workspace

logger = logging.getLogger("distcomp")


Job = Callable[["Turn | None"], torch.Tensor]
"""A bucket's work: called with its :class:`Turn` when pipelined, else with None; returns the averaged buffer."""


class InlineExecutor:
    """Runs each job immediately on ``group`` (None: the default group); the returned future is already complete."""

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group

    def submit(self, job: Job, *, pipelined: bool = False, data: torch.Tensor | None = None) -> torch.futures.Future:
        """Run ``job`` now, on the caller's stream (``pipelined`` is ignored: there is nothing to overlap with)."""
        fut = new_future(data)
        try:
            fut.set_result(job(None))
        except BaseException as exc:  # noqa: BLE001 - DDP re-raises it from backward()
            fut.set_exception(exc)
        return fut

    def shutdown(self) -> None:
        """Nothing to stop: the group belongs to the caller."""


class WorkerExecutor:
    """Runs jobs in submission order on one background thread, which talks on ``group``.

    The executor owns ``group``: :meth:`shutdown` destroys it.
    """

    def __init__(self, group: dist.ProcessGroup, name: str = "distcomp-comm", threads: int = 1) -> None:
        self.group: dist.ProcessGroup | None = group
        # torch's intra-op thread count is per thread: a fresh thread would use every core, so its first matrix
        # products (PowerSGD's, right after a resume) would round differently from the caller's.
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=threads,
            thread_name_prefix=name,
            initializer=torch.set_num_threads,
            initargs=(torch.get_num_threads(),),
        )
        self._streams = WorkerStreams()
        _OPEN.add(self)

    def submit(self, job: Job, *, pipelined: bool = False, data: torch.Tensor | None = None) -> torch.futures.Future:
        """Queue ``job`` behind the earlier ones (``pipelined`` is ignored: one thread runs them one by one).

        ``data`` is the tensor the job reads (a bucket's buffer): on CUDA the job
        runs on the worker's stream after the work queued on the caller's
        stream, and the future carries the device.
        """
        fut, handoff = new_future(data), Handoff(data)

        def run() -> None:
            with handoff.on_worker(self._streams):
                try:
                    fut.set_result(job(None))
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


class PipelinedExecutor(WorkerExecutor):
    """Runs jobs in submission order on two threads, one at a time, handing over at a pipelined job's last wait.

    A job submitted with ``pipelined=True`` must issue its collectives through a
    :class:`~distcomp.comm.Comm` that holds its :class:`Turn`, and the last one
    with ``last=True``: there it hands the baton on (see :meth:`Turn.wait`).
    Any other job starts only once every earlier job has finished, as on
    :class:`WorkerExecutor`. Workspaces are doubled (:meth:`Turn.workspace`),
    since two buckets may be in flight.
    """

    def __init__(self, group: dist.ProcessGroup, name: str = "distcomp-comm") -> None:
        # Two threads: one job waiting for its last collective, the next one running.
        super().__init__(group, name, threads=2)
        self._cond = threading.Condition()
        self._submitted = 0
        self._unfinished: set[int] = set()
        self._turn = 0
        """The job that may start next: every earlier one has issued its last collective (or finished)."""
        self._holder: int | None = None
        """The job holding the baton (running), if any."""
        self._shadows: dict[int, tuple[Workspace, Workspace]] = {}
        self.overlapped = 0
        """Jobs that started while the previous one was still waiting for its last collective."""

    def submit(self, job: Job, *, pipelined: bool = False, data: torch.Tensor | None = None) -> torch.futures.Future:
        """Queue ``job``; with ``pipelined`` it may start while the previous job waits for its last collective."""
        fut, handoff = new_future(data), Handoff(data)
        with self._cond:
            seq, self._submitted = self._submitted, self._submitted + 1
            self._unfinished.add(seq)

        def run() -> None:
            self._start(seq, pipelined)
            # Both threads use the same stream per device: the baton already orders the jobs.
            with handoff.on_worker(self._streams):
                try:
                    result = job(Turn(self, seq) if pipelined else None)
                except BaseException as exc:  # noqa: BLE001 - DDP re-raises it from backward()
                    self._finish(seq)
                    fut.set_exception(exc)
                    return
                self._finish(seq)
                fut.set_result(result)

        self._pool.submit(run)
        return fut

    def _start(self, seq: int, pipelined: bool) -> None:
        # A pipelined job may overlap only the one before it: two buckets in flight, two workspaces.
        earliest = seq - 1 if pipelined else seq
        with self._cond:
            self._cond.wait_for(
                lambda: self._turn == seq and self._holder is None and min(self._unfinished) >= earliest
            )
            self._holder = seq
            self.overlapped += int(min(self._unfinished) < seq)

    def _release(self, seq: int) -> None:
        """Give up the baton; the first release of job ``seq`` lets the next job start."""
        self._holder = None
        if self._turn == seq:
            self._turn = seq + 1
        self._cond.notify_all()

    def _finish(self, seq: int) -> None:
        with self._cond:
            self._unfinished.discard(seq)
            self._release(seq)

    def _resume(self, seq: int) -> None:
        """Take the baton back once every earlier job has finished (their state updates come first)."""
        with self._cond:
            self._cond.wait_for(lambda: self._holder is None and min(self._unfinished) == seq)
            self._holder = seq

    def _workspace(self, ws: Workspace, slot: int) -> Workspace:
        if slot == 0:
            return ws
        # Keyed by id, with ws itself held so that the id cannot be reused while the shadow lives.
        _, shadow = self._shadows.setdefault(id(ws), (ws, Workspace()))
        return shadow


class Turn:
    """One pipelined job's place in a :class:`PipelinedExecutor`: its workspace slot and its hand-over wait."""

    def __init__(self, executor: PipelinedExecutor, seq: int) -> None:
        self._executor = executor
        self._seq = seq

    def workspace(self, ws: Workspace) -> Workspace:
        """``ws`` or its twin: consecutive jobs use different ones, since both may be in flight."""
        return self._executor._workspace(ws, self._seq % 2)

    def wait(self, work: dist.Work) -> None:
        """Wait for ``work``, the job's last collective, letting the next job run meanwhile.

        Returns with the baton back, once every earlier job has finished.
        """
        ex = self._executor
        with ex._cond:
            # Alone in flight with no later bucket queued there is nothing to overlap: keeping the baton saves
            # two thread switches. An earlier job still in flight must get the baton back, to finish first.
            hand_on = ex._submitted > self._seq + 1 or min(ex._unfinished) < self._seq
            if hand_on:
                ex._release(self._seq)
        try:
            work.wait()
        finally:
            if hand_on:
                ex._resume(self._seq)


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
