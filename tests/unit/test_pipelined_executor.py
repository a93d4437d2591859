"""The pipelined executor's schedule, with stand-in collectives: who may run when.

A job starts only after the one before it issued its last collective; the code
after a wait runs in job order; a job that is not pipelined waits for every
earlier job to finish; and at most two jobs are in flight, each with its own
workspace.
"""

from __future__ import annotations

import threading

import torch

from distcomp.hooks.executor import PipelinedExecutor, Turn
from distcomp.workspace import Workspace

TIMEOUT_S = 30


class FakeWork:
    """A collective in flight that completes when the test says so."""

    def __init__(self) -> None:
        self.done = threading.Event()

    def wait(self) -> bool:
        assert self.done.wait(TIMEOUT_S), "the test never completed this collective"
        return True


def _job(k: int, log: list[str], works: dict[int, FakeWork]):
    def job(turn: Turn | None) -> torch.Tensor:
        log.append(f"start {k}")
        if turn is not None:
            log.append(f"issue {k}")
            turn.wait(works[k])
            log.append(f"after {k}")
        return torch.tensor([k])

    return job


def _until(cond, what: str) -> None:
    pause = threading.Event()  # never set: wait() is a sleep
    for _ in range(TIMEOUT_S * 100):
        if cond():
            return
        pause.wait(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def test_jobs_overlap_only_at_the_last_collective_and_finish_in_order() -> None:
    ex = PipelinedExecutor(group=object())  # type: ignore[arg-type] - no collective is issued
    log: list[str] = []
    works = {k: FakeWork() for k in range(3)}
    try:
        with ex._cond:  # all three queued before job 0 runs: each has a later job to hand on to
            futs = [ex.submit(_job(k, log, works), pipelined=True) for k in range(3)]
        _until(lambda: "issue 1" in log, "job 1 to start while job 0 waits")
        assert log == ["start 0", "issue 0", "start 1", "issue 1"], "job 2 must wait for job 0 to finish"
        works[1].done.set()  # job 1's collective finishes first: its code must still wait for job 0's
        works[0].done.set()
        _until(lambda: "issue 2" in log and "after 1" in log, "jobs 0 and 1 to finish")
        # Job 2 may overlap job 1 (which has issued its collective), never job 0.
        assert log.index("after 0") < log.index("after 1") and log.index("after 0") < log.index("start 2")
        works[2].done.set()
        assert [int(f.wait()) for f in futs] == [0, 1, 2]
        assert ex.overlapped >= 1, "job 1 started while job 0 was in flight"
    finally:
        for w in works.values():
            w.done.set()
        ex.shutdown()


def test_a_job_that_is_not_pipelined_waits_for_every_earlier_job() -> None:
    ex = PipelinedExecutor(group=object())  # type: ignore[arg-type]
    log: list[str] = []
    works = {0: FakeWork()}
    try:
        first = ex.submit(_job(0, log, works), pipelined=True)
        second = ex.submit(_job(1, log, works), pipelined=False)
        _until(lambda: "issue 0" in log, "job 0 to wait")
        threading.Event().wait(0.1)
        assert "start 1" not in log
        works[0].done.set()
        first.wait()
        second.wait()
        assert log == ["start 0", "issue 0", "after 0", "start 1"]
    finally:
        works[0].done.set()
        ex.shutdown()


def test_a_job_alone_in_flight_keeps_the_thread() -> None:
    ex = PipelinedExecutor(group=object())  # type: ignore[arg-type]
    log: list[str] = []
    works = {0: FakeWork()}
    try:
        first = ex.submit(_job(0, log, works), pipelined=True)
        _until(lambda: "issue 0" in log, "job 0 to wait")
        with ex._cond:
            assert ex._holder == 0, "no later job was queued: nothing to hand on to"
        works[0].done.set()
        assert int(first.wait()) == 0 and ex.overlapped == 0
    finally:
        works[0].done.set()
        ex.shutdown()


def test_consecutive_jobs_get_different_workspaces() -> None:
    ex = PipelinedExecutor(group=object())  # type: ignore[arg-type]
    ws = Workspace()
    try:
        a, b, c = (Turn(ex, k).workspace(ws) for k in range(3))
        assert a is ws and b is not ws and c is ws
        assert Turn(ex, 5).workspace(ws) is b, "one twin per workspace"
    finally:
        ex.shutdown()
